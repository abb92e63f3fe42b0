"""models: sealed ONNX models, the in-enclave inference server, the client SDK and the bundled
digits model."""
