"""hayate: a real-time inference engine and server for open language and vision-language models."""
import os as _os

# libgomp's threads spin for 5-10 ms after each parallel region before they sleep
# (GOMP_SPINCOUNT 300000): after an eager prefill they take a core from the planned decode
# step's own threads, and the token after the first came 3x late (11 ms, not 3.5). 20000
# spins (~0.3 ms) still bridge the gaps between a prefill's operators (its time to first
# token measured unchanged). libgomp reads it once, when torch loads it: hence here, first.
if "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "20000"
    _os.environ["HAYATE_SET_GOMP_SPINCOUNT"] = "1"   # peers that `hayate bench` starts get libgomp's own
