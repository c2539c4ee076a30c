"""load_image_url / load_image_file: data: URIs, the local-folder rule, and the remote-fetch guards."""
import base64
import hashlib
import io
import ipaddress
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from hayate.multimodal import media
from image_samples import data_uri
from hayate.multimodal.image import ImageLimits, MediaError
from hayate.multimodal.media import MediaPolicy, load_image_file, load_image_url


def png_bytes(size=(8, 6), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def refused(url: str, policy: MediaPolicy) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load_image_url(url, policy)
    assert "\n" not in str(caught.value)
    return caught.value


# --- data: URIs ---------------------------------------------------------------------------

def test_data_uri_decodes():
    data = png_bytes()
    decoded = load_image_url(data_uri(data), MediaPolicy())
    assert decoded.format == "PNG" and decoded.image.size == (8, 6)
    assert decoded.content_hash == hashlib.sha256(data).hexdigest()


def test_data_uri_jpg_alias_wrapped_lines_and_missing_padding():
    encoded = base64.b64encode(jpeg_bytes()).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert load_image_url(f"data:image/jpg;base64,{wrapped}", MediaPolicy()).format == "JPEG"


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png;base64,!!!not-base64!!!", "invalid base64"),
        ("data:text/plain;base64,aGVsbG8=", "expected image/*"),
        ("data:;base64,aGVsbG8=", "expected image/*"),
        ("data:image/png," + base64.b64encode(b"x").decode(), "must be base64-encoded"),
        ("data:image/png;base64", "malformed data: URI"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "unsupported or corrupt image data"),
    ],
)
def test_bad_data_uris_are_400(url, message):
    error = refused(url, MediaPolicy())
    assert error.status == 400
    assert message in str(error)


def test_data_uri_declared_type_must_match():
    error = refused(data_uri(png_bytes(), "image/jpeg"), MediaPolicy())
    assert str(error) == "the image is PNG data but was declared image/jpeg"


def test_huge_data_uri_is_refused_before_decoding(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 was decoded")

    monkeypatch.setattr(media.base64, "b64decode", no_decoding)
    policy = MediaPolicy(limits=ImageLimits(max_bytes=1000))
    error = refused("data:image/png;base64," + "A" * 4000, policy)
    assert error.status == 413


# --- local files --------------------------------------------------------------------------

@pytest.fixture
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes(color=(1, 2, 3)))
    return allowed


def test_local_paths_need_the_allowed_dir(media_dir):
    for url in (str(media_dir / "cat.png"), f"file://{media_dir}/cat.png"):
        error = refused(url, MediaPolicy())
        assert error.status == 400
        assert "--allowed-media-dir" in str(error)


def test_local_paths_inside_the_allowed_dir_load(media_dir):
    policy = MediaPolicy(allowed_media_dir=media_dir)
    urls = (str(media_dir / "cat.png"), f"file://{media_dir}/cat.png", f"file://localhost{media_dir}/cat.png")
    for url in urls:
        assert load_image_url(url, policy).image.size == (8, 6)


@pytest.mark.parametrize("escape", ["../secret.png", "sub/../../secret.png", "link.png"])
def test_escapes_from_the_allowed_dir_are_refused(media_dir, escape):
    (media_dir / "sub").mkdir()
    (media_dir / "link.png").symlink_to(media_dir.parent / "secret.png")
    policy = MediaPolicy(allowed_media_dir=media_dir)
    for url in (f"{media_dir}/{escape}", f"file://{media_dir}/{escape}"):
        error = refused(url, policy)
        assert error.status == 400
        assert "is outside --allowed-media-dir" in str(error)


def test_symlinks_within_the_allowed_dir_are_fine(media_dir):
    (media_dir / "alias.png").symlink_to(media_dir / "cat.png")
    assert load_image_url(str(media_dir / "alias.png"), MediaPolicy(allowed_media_dir=media_dir))


def test_allowed_dir_may_itself_be_a_symlink(media_dir, tmp_path):
    (tmp_path / "alias_dir").symlink_to(media_dir)
    policy = MediaPolicy(allowed_media_dir=tmp_path / "alias_dir")
    assert load_image_url(str(tmp_path / "alias_dir" / "cat.png"), policy)


@pytest.mark.parametrize(
    "name, message",
    [("missing.png", "no such image file"), (".", "not a regular file"), ("huge.png", "too large")],
)
def test_local_file_errors(media_dir, name, message):
    (media_dir / "huge.png").write_bytes(b"\0" * 5000)
    policy = MediaPolicy(limits=ImageLimits(max_bytes=4000), allowed_media_dir=media_dir)
    error = refused(f"{media_dir}/{name}", policy)
    assert message in str(error)
    assert error.status == (413 if name == "huge.png" else 400)


@pytest.mark.parametrize(
    "url", ["file://otherhost/etc/passwd", "relative/cat.png", "ftp://example.com/x.png", "cat.png"]
)
def test_other_references_are_refused(media_dir, url):
    assert refused(url, MediaPolicy(allowed_media_dir=media_dir)).status == 400


def test_load_image_file_has_no_folder_rule(media_dir):
    assert load_image_file(media_dir.parent / "secret.png", ImageLimits()).image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(MediaError, match="no such image file: /nope/cat.png"):
        load_image_file("/nope/cat.png", ImageLimits())
    with pytest.raises(MediaError, match="not a regular file"):
        load_image_file(media_dir, ImageLimits())


def test_no_file_handles_are_left_open(media_dir):
    (media_dir / "junk.png").write_bytes(b"junk")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image_file(media_dir / "cat.png", ImageLimits())
        with pytest.raises(MediaError):
            load_image_file(media_dir / "junk.png", ImageLimits())
    assert len(os.listdir("/proc/self/fd")) == before


# --- remote: refused before any connection ------------------------------------------------

REMOTE = MediaPolicy(allow_remote_media=True, timeout_s=2.0)
FAKE_DNS = {
    "localhost": ["127.0.0.1", "::1"],
    "intranet.example": ["10.1.2.3"],
    "mixed.example": ["93.184.215.14", "192.168.0.7"],
    "metadata.example": ["169.254.169.254"],
    "images.example.com": ["93.184.215.14"],
}


@pytest.fixture
def fake_network(monkeypatch):
    """Fake DNS; every request that reaches the transport is recorded and answered with a PNG."""
    sent = []
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host not in FAKE_DNS:
            raise socket.gaierror("no such host")
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [(family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port))
                for a in FAKE_DNS[host]]

    def handle_request(transport, request):
        sent.append(request)
        return httpx.Response(200, content=png_bytes())

    monkeypatch.setattr(media.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", handle_request)
    return sent, lookups


def test_remote_urls_are_off_by_default(fake_network):
    error = refused("https://images.example.com/cat.png", MediaPolicy())
    assert error.status == 400 and "--allow-remote-media" in str(error)
    assert fake_network == ([], [])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/x.png", "http://localhost/", "http://10.0.0.1/", "http://169.254.169.254/",
        "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/", "http://0.0.0.0/",
        "http://100.100.100.200/", "http://[fd00:ec2::254]/", "http://224.0.0.1/", "http://[2002:7f00:1::]/",
        "http://[64:ff9b::a9fe:a9fe]/", "http://[fe80::1]/", "https://intranet.example/x.png",
        "http://mixed.example/x.png", "http://metadata.example/latest/meta-data/", "http://2130706433/",
    ],
)
def test_non_public_addresses_are_refused_before_connecting(fake_network, url):
    error = refused(url, REMOTE)
    assert error.status == 400
    assert "non-public address" in str(error) or "cannot resolve" in str(error)
    assert fake_network[0] == []


@pytest.mark.parametrize(
    "url", ["http://no-such-host.invalid/x.png", "http:///x.png", "http://a:b@images.example.com/"]
)
def test_unusable_remote_urls_are_400(fake_network, url):
    assert refused(url, REMOTE).status == 400
    assert fake_network[0] == []


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111", "2002:5db8:d70e::1"])
def test_public_addresses_pass_the_check(address):
    assert media._address_is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("scheme, port", [("http", 80), ("https", 443)])
def test_requests_go_to_the_checked_address_with_the_original_name(fake_network, scheme, port):
    sent, lookups = fake_network
    decoded = load_image_url(f"{scheme}://images.example.com/cat.png?size=small", REMOTE)
    assert decoded.format == "PNG"
    assert lookups == ["images.example.com"]
    (request,) = sent
    assert request.url.host == "93.184.215.14" and request.url.port in (None, port)
    assert request.url.path == "/cat.png" and request.url.query == b"size=small"
    assert request.headers["host"] == "images.example.com"
    assert request.extensions.get("sni_hostname") == ("images.example.com" if scheme == "https" else None)


def test_ip_literal_hosts_keep_their_brackets_and_port(fake_network):
    sent, lookups = fake_network
    load_image_url("http://[2606:4700:4700::1111]:8080/cat.png", REMOTE)
    assert lookups == []  # an IP literal needs no lookup
    assert sent[0].url.host == "2606:4700:4700::1111" and sent[0].url.port == 8080
    assert sent[0].headers["host"] == "[2606:4700:4700::1111]:8080"


# --- remote: a real local server (its loopback address admitted for these tests only) --------

class ImageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # no Content-Length needed: the body ends when the connection does

    def do_GET(self):
        routes = {
            "/good.png": lambda: self.reply(200, png_bytes(size=(12, 10))),
            "/missing.png": lambda: self.reply(404, b"not found"),
            "/to-good": lambda: self.redirect("/good.png"),
            "/to-metadata": lambda: self.redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": lambda: self.redirect("http://10.0.0.1/x.png"),
            "/to-file": lambda: self.redirect("file:///etc/passwd"),
            "/loop": lambda: self.redirect("/loop"),
            "/endless": self.endless_body,
            "/declared-huge": self.declared_huge,
            "/slow": self.slow,
        }
        routes.get(self.path, lambda: self.reply(404, b""))()

    def reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def endless_body(self):
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(1000):  # 64 MB if nobody stops reading
                self.wfile.write(b"\0" * 65536)
        except OSError:
            self.server.cut_off.set()

    def declared_huge(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10 ** 9))
        self.end_headers()

    def slow(self):
        time.sleep(1.5)
        self.reply(200, png_bytes())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def running_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True  # a still-sleeping /slow handler must not hold up teardown
    server.cut_off = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def image_server(running_server, monkeypatch):
    """The local server, with 127.0.0.1 counted as public (every other address still checked)."""
    strict_check = media._address_is_public
    loopback = ipaddress.ip_address("127.0.0.1")

    def admit_loopback(address):
        return address == loopback or strict_check(address)

    monkeypatch.setattr(media, "_address_is_public", admit_loopback)
    running_server.cut_off.clear()
    return running_server


def served(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_a_good_remote_png_decodes(image_server):
    decoded = load_image_url(served(image_server, "/good.png"), REMOTE)
    assert decoded.format == "PNG" and decoded.image.size == (12, 10)
    assert decoded.content_hash == hashlib.sha256(png_bytes(size=(12, 10))).hexdigest()


def test_redirects_are_followed(image_server):
    assert load_image_url(served(image_server, "/to-good"), REMOTE).image.size == (12, 10)


@pytest.mark.parametrize("path", ["/to-metadata", "/to-private"])
def test_every_redirect_hop_is_rechecked(image_server, path):
    error = refused(served(image_server, path), REMOTE)
    assert error.status == 400 and "non-public address" in str(error)


def test_redirect_to_another_scheme_is_refused(image_server):
    assert "unsupported URL" in str(refused(served(image_server, "/to-file"), REMOTE))


def test_redirects_are_limited(image_server):
    error = refused(served(image_server, "/loop"), MediaPolicy(allow_remote_media=True, max_redirects=3))
    assert error.status == 400 and "more than 3 redirects" in str(error)


def test_a_body_over_the_limit_is_cut_off(image_server):
    policy = MediaPolicy(limits=ImageLimits(max_bytes=200_000), allow_remote_media=True)
    assert refused(served(image_server, "/endless"), policy).status == 413
    assert image_server.cut_off.wait(timeout=5)  # the server saw us stop reading


def test_a_declared_length_over_the_limit_is_413(image_server):
    assert refused(served(image_server, "/declared-huge"), REMOTE).status == 413


def test_http_errors_name_the_status(image_server):
    error = refused(served(image_server, "/missing.png"), REMOTE)
    assert error.status == 400 and "HTTP 404" in str(error)


def test_timeouts_and_connection_errors_are_400(image_server):
    quick = MediaPolicy(allow_remote_media=True, timeout_s=0.3)
    assert "timed out" in str(refused(served(image_server, "/slow"), quick))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    error = refused(f"http://127.0.0.1:{closed_port}/x.png", REMOTE)
    assert error.status == 400 and str(error).startswith("could not fetch image:")
