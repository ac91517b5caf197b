"""ONNX Runtime sessions, the predictor, the HTTP server and the benchmark (installed as adalora_deploy.runtime)."""
