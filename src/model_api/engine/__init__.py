"""Model engines behind one interface (see :mod:`model_api.engine.base`); the
runtime picks one from ``MODEL_BACKEND``."""
