"""Test and benchmark helpers that talk the real S3 protocol on loopback.

`s3server`: a moto S3 server on 127.0.0.1 (in a child process or a thread),
fake credentials, and a byte-counting TCP relay. `faultproxy`: an HTTP proxy
that injects faults (5xx, resets, truncated bodies) between a client and that
server. Neither is imported by the rest of vaultsh; moto is needed only here.
"""
