"""KV transfer between engines: a worker pulls a cached prefix from a peer instead of recomputing it.

``config`` the settings; ``protocol`` the versioned control messages and the KV layout header;
``transport`` the interface to the byte mover (``mooncake`` implements it; NIXL can on GPU machines);
``buffer`` registered transfer memory and its leases; ``pages`` the engine-thread side (find a chain
of block hashes, copy its pages out of any tier, import pages into the pool and radix tree);
``exporter`` the source side; ``fetcher`` the destination side; ``service`` puts them together for
one engine. The control protocol is documented in ``docs/kv-transfer.md``.
"""
