"""Serving the promoted model with BentoML: the loaded model, the prediction log, packaging and the service."""
