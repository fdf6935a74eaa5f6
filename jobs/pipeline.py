"""Ray job entry point for the whole pipeline.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/imagenette.yaml [key=value ...]
"""

from ktray.jobs import main

if __name__ == "__main__":
    raise SystemExit(main("run"))
