"""What both sides share on the wire: the tensor format (`wire`), gRPC plumbing (`rpc`) and update compression."""
