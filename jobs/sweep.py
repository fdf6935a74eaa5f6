"""Ray job entry point for a Ray Tune sweep over cluster.k and pretext.max_foreign.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/imagenette.yaml [key=value ...]
"""

from ktray.jobs import main

if __name__ == "__main__":
    raise SystemExit(main("sweep"))
