"""Talking to vTPM Keeper as a client over the bus: the requests and queries policy and the
state store answer (:mod:`.client`), their answers put together per VM and host
(:mod:`.views`), what a deletion loses (:mod:`.loss`), and the outcomes every client
reports the same way (:mod:`.outcomes`). The ``keeper`` CLI and the HTTP API both use it,
so both send the same requests and give the same reasons."""
