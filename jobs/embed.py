"""Ray job entry point for the embed stage (and whatever upstream stages are not done yet).

    ray job submit --working-dir . -- python jobs/embed.py --config configs/imagenette.yaml [key=value ...]
"""

from ktray.jobs import main

if __name__ == "__main__":
    raise SystemExit(main("embed"))
