"""Replicas of hayate's server on Ray Serve (`hayate serve --ray`), an optional extra:
`pip install 'hayate[ray]'`. Only ray_serve.py, router.py and deployments.py import Ray; the
options, the prefix hashing and the relay's framing are plain Python, tested without it."""
