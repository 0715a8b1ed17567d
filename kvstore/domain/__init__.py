"""The domain layer: chunk ids and metadata, the error hierarchy, namespaces and the one
chunk-header check. No grpc, no protobuf, no storage: everything else builds on it."""
