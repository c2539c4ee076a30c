"""Where a user's image may come from: data: URIs, one local folder, and (opt-in) public http(s)."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from hayate.multimodal.image import (
    DecodedImage,
    ImageLimits,
    MediaError,
    check_byte_size,
    decode_image,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services; most are already non-global, listed so the intent is explicit.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text) for text in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class MediaPolicy:
    limits: ImageLimits = ImageLimits()
    allowed_media_dir: Path | None = None   # local paths / file:// URLs only under this folder
    allow_remote_media: bool = False        # http(s) only when True
    timeout_s: float = 10.0                 # whole download, all redirects included
    max_redirects: int = 5
    default_detail: str = "auto"            # an image part's `detail` when it gives none


def load_image_url(url: str, policy: MediaPolicy) -> DecodedImage:
    """Resolve one `image_url` from a request. Blocking: the server runs it in a thread."""
    begin = time.perf_counter()
    image = _load_url(url, policy)
    return replace(image, load_seconds=time.perf_counter() - begin)


def _load_url(url: str, policy: MediaPolicy) -> DecodedImage:
    if url[:5].lower() == "data:":
        return _load_data_uri(url, policy.limits)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if url.startswith("/") or scheme == "file":
        return _load_local(url, policy)
    if scheme in _DEFAULT_PORTS:
        return decode_image(_fetch_remote(url, policy), policy.limits)
    raise MediaError(
        f"unsupported image URL {_shorten(url)!r}; expected a data:image/...;base64 URI, "
        "an http(s):// URL, or a file:// URL / absolute path"
    )


def load_image_file(path: str | Path, limits: ImageLimits) -> DecodedImage:
    """An image path the CLI user typed: no folder restriction."""
    begin = time.perf_counter()
    image = decode_image(_read_file(Path(path), limits, shown=str(path)), limits)
    return replace(image, load_seconds=time.perf_counter() - begin)


# --- data: URIs ---------------------------------------------------------------------------

def _load_data_uri(url: str, limits: ImageLimits) -> DecodedImage:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError("malformed data: URI; expected data:image/<type>;base64,<data>")
    mime, *params = header.split(";")
    mime = mime.strip().lower()
    if not mime.startswith("image/"):
        raise MediaError(f"the data: URI has type {_shorten(mime or 'text/plain')!r}; expected image/*")
    if "base64" not in (param.strip().lower() for param in params):
        raise MediaError("data: URI images must be base64-encoded (data:image/<type>;base64,<data>)")
    # Refuse a huge URI from its length, before paying for decoding it.
    check_byte_size(len(payload.rstrip("=")) * 3 // 4, limits, estimated=True)
    return decode_image(_decode_base64(payload), limits, declared_mime=mime)


def _decode_base64(payload: str) -> bytes:
    compact = "".join(payload.split())  # some clients wrap base64 lines
    compact += "=" * (-len(compact) % 4)  # and some drop the padding
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URI holds invalid base64") from None


# --- local files --------------------------------------------------------------------------

def _load_local(url: str, policy: MediaPolicy) -> DecodedImage:
    path = _local_path_of(url)
    if policy.allowed_media_dir is None:
        raise MediaError("local image paths are not allowed; start the server with --allowed-media-dir")
    # realpath resolves symlinks and `..`, so neither can step outside the folder.
    real_path = Path(os.path.realpath(path))
    if not real_path.is_relative_to(os.path.realpath(policy.allowed_media_dir)):
        raise MediaError(f"the image path {path} is outside --allowed-media-dir")
    return decode_image(_read_file(real_path, policy.limits, shown=path), policy.limits)


def _local_path_of(url: str) -> str:
    if url.startswith("/"):
        path = url
    else:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError("file:// URLs must name a local path, as in file:///abs/path.png")
        path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise MediaError(f"invalid local image path {_shorten(path)!r}; it must be absolute")
    return path


def _read_file(path: Path, limits: ImageLimits, shown: str) -> bytes:
    """Read at most max_bytes + 1 bytes of a regular file, with one-line errors."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang the request.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as image_file:
            file_stat = os.fstat(image_file.fileno())
            if not stat.S_ISREG(file_stat.st_mode):
                raise MediaError(f"not a regular file: {shown}")
            check_byte_size(file_stat.st_size, limits)
            data = image_file.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise MediaError(f"no such image file: {shown}") from None
    except IsADirectoryError:
        raise MediaError(f"not a regular file: {shown}") from None
    except OSError as error:
        raise MediaError(f"cannot read image file {shown}: {error.strerror or error}") from None
    check_byte_size(len(data), limits)  # the file may have grown since fstat
    return data


# --- remote http(s) -----------------------------------------------------------------------

@dataclass(frozen=True)
class _PinnedRequest:
    """One hop's request, aimed at the address we checked so DNS cannot change it afterwards."""
    url: str                   # the URL with its host replaced by the checked IP
    host_header: str           # the original host[:port]
    sni_hostname: str | None   # https: the name the certificate is checked against


@dataclass(frozen=True)
class _Hop:
    body: bytes | None = None      # the image, when the server answered 200
    location: str | None = None    # the next URL, when it redirected


def _fetch_remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote_media:
        raise MediaError("remote image URLs are not allowed; start the server with --allow-remote-media")
    deadline = time.monotonic() + policy.timeout_s
    # trust_env=False: an environment proxy would connect by name and undo the address check.
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            hop = _fetch_hop(client, _pin_to_checked_address(url), policy.limits, deadline)
            if hop.body is not None:
                return hop.body
            url = urljoin(url, hop.location)
    raise MediaError(f"could not fetch image: more than {policy.max_redirects} redirects")


def _pin_to_checked_address(url: str) -> _PinnedRequest:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise MediaError(f"could not fetch image: redirected to an unsupported URL {_shorten(url)!r}")
    if parts.username is not None or parts.password is not None:
        raise MediaError("image URLs with credentials (user:password@) are not supported")
    host = _ascii_host(parts.hostname)
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise MediaError(f"the image URL has an invalid port: {_shorten(url)!r}") from None
    address = _checked_address(host, port)
    ip_netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    bracketed = f"[{host}]" if ":" in host else host
    return _PinnedRequest(
        url=urlunsplit((scheme, ip_netloc, parts.path or "/", parts.query, "")),
        host_header=f"{bracketed}:{parts.port}" if parts.port else bracketed,
        sni_hostname=host if scheme == "https" else None,
    )


def _ascii_host(hostname: str | None) -> str:
    if not hostname:
        raise MediaError("the image URL has no host")
    try:
        return hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise MediaError(f"the image URL has an invalid host {_shorten(hostname)!r}") from None


def _checked_address(host: str, port: int) -> IPAddress:
    """Every address the name resolves to must be public, else one of them could be used."""
    addresses = _resolve(host, port)
    for address in addresses:
        if not _address_is_public(address):
            raise MediaError(
                f"refusing to fetch an image from {host}: it resolves to the non-public address {address}"
            )
    return addresses[0]


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass  # a name, not an IP literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        raise MediaError(f"could not fetch image: cannot resolve the host {host}")
    return addresses


def _address_is_public(address: IPAddress) -> bool:
    """True for globally routable unicast addresses; tests replace this to admit 127.0.0.1."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return _address_is_public(embedded)
    return address.is_global and not (
        address.is_loopback or address.is_private or address.is_link_local
        or address.is_multicast or address.is_reserved or address.is_unspecified
        or address in _METADATA_ADDRESSES
    )


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (::ffff:a.b.c.d, 6to4, NAT64), judged on its own."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _fetch_hop(client: httpx.Client, pinned: _PinnedRequest, limits: ImageLimits, deadline: float) -> _Hop:
    time_left = deadline - time.monotonic()
    if time_left <= 0:
        raise MediaError("could not fetch image: timed out")
    extensions = {"sni_hostname": pinned.sni_hostname} if pinned.sni_hostname else {}
    headers = {"Host": pinned.host_header, "Accept": "image/*", "Accept-Encoding": "identity"}
    try:
        request = client.build_request(
            "GET", pinned.url, headers=headers, extensions=extensions, timeout=time_left
        )
        response = client.send(request, stream=True)
        try:
            return _read_hop(response, limits, deadline)
        finally:
            response.close()  # also drops a redirect's or an oversized body unread
    except httpx.TimeoutException:
        raise MediaError("could not fetch image: timed out") from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise MediaError(f"could not fetch image: {_one_line(error)}") from None


def _read_hop(response: httpx.Response, limits: ImageLimits, deadline: float) -> _Hop:
    if response.status_code in _REDIRECT_STATUSES:
        return _Hop(location=_redirect_location(response))
    if response.status_code != 200:
        raise MediaError(f"could not fetch image: the server answered HTTP {response.status_code}")
    return _Hop(body=_read_body(response, limits, deadline))


def _redirect_location(response: httpx.Response) -> str:
    location = response.headers.get("location")
    if not location:
        raise MediaError(f"could not fetch image: HTTP {response.status_code} redirect without a Location")
    return location


def _read_body(response: httpx.Response, limits: ImageLimits, deadline: float) -> bytes:
    """Stream the body, stopping as soon as it passes the byte limit or the deadline."""
    declared_length = response.headers.get("content-length", "")
    if declared_length.isdigit():
        check_byte_size(int(declared_length), limits)
    chunks: list[bytes] = []
    num_received = 0
    for chunk in response.iter_bytes():
        num_received += len(chunk)
        check_byte_size(num_received, limits)
        if time.monotonic() > deadline:
            raise MediaError("could not fetch image: timed out")
        chunks.append(chunk)
    return b"".join(chunks)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
