"""How replicas meet: the rendezvous of one process's replicas, and collectives across processes."""
