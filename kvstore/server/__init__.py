"""The gRPC front end: thin servicers translating protobuf <-> domain and errors <-> status codes."""
