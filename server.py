"""Serve Stable Diffusion: python server.py [--weights FILE] [--port 7860] (see --help).

The AUTOMATIC1111 API at http://127.0.0.1:7860/sdapi/v1 and a web page at http://127.0.0.1:7860/. Run from a fresh
clone, it first installs this package and its dependencies with pip.
"""

from text2image import set_up

if __name__ == "__main__":
    set_up("sd-server")
    from stable_diffusion_tf.server import main

    raise SystemExit(main())
