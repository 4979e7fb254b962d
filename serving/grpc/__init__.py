"""The Open Inference Protocol over gRPC (a transport beside serving.http)."""
