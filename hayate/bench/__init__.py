"""hayate bench: single-stream speed of the engine, side by side with llama.cpp and transformers.

offline.py measures hayate in this process; peer_worker.py measures a peer in its own
process (its own venv, its own thread pools) and prints the same raw timings as JSON;
timings.py turns raw timings into the figures every engine is reported with."""
