"""Generated gRPC messages and stubs of proto/asr/v1 (`make proto`); do not edit by hand."""
