"""hayate bench: single-stream speed of the engine, side by side with llama.cpp and transformers.

offline.py measures hayate in this process; peer_worker.py serves a peer in its own process
(its own venv, its own thread pools), loaded once; rounds.py has them take turns, request by
request; timings.py turns raw timings into the figures every engine is reported with;
background.py runs a busy loop beside them all when asked (--background)."""
