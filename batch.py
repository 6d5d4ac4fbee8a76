"""Generate one image per line of a JSON-lines file of jobs, here or on a Ray cluster:
python batch.py JOBS.jsonl --output-dir DIR [--ray [ADDRESS]] (see --help).

Run from a fresh clone, it first installs this package and its dependencies with pip (Ray: `pip install -e .[ray]`).
"""

from text2image import set_up

if __name__ == "__main__":
    set_up("sd-batch")
    from stable_diffusion_tf.batch import main

    raise SystemExit(main())
