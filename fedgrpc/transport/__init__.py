"""What both sides share on the wire: the tensor format (`wire`), gRPC plumbing (`rpc`), TLS (`tls`) and update
compression."""
