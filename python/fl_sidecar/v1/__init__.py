"""Generated protobuf and gRPC code (make proto). Never edit by hand."""
