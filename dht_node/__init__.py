"""dht-node: a standalone Kademlia DHT daemon holding Pollen's dictionary records.

Nodes form the overlay over UDP (kademlia package, hardened in protocol.py); shard servers and clients
use the `pollen.v1.Dht` gRPC service on the same port number. Never imports torch.

Modules: cli (flags → config → run), config (DhtNodeConfig), node (DhtNode lifecycle and operations),
wire (datagrams in and out: requests, replies, address tokens), datagram (the swarm key's MAC, address
validation against amplification), liveness (round trips, suspect and dead contacts), protocol (Kademlia rpc
handlers, routing-table upkeep), storage (records, merge, caps, wire form), crawl (lookups), servicer (gRPC),
validation (signatures and schemas), probe (`--probe`).
"""
