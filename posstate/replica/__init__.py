"""Off the machine: continuous encrypted replication to S3-compatible storage or a mounted disk.

Beside ``backup/`` and below ``manager/``: the shipper (``shipper.py``) uploads the state file and byte ranges
of the journal exactly as they are on disk (encrypted, authenticated) through one :class:`ReplicaClient`
(``client.py``; ``s3.py`` over boto3, ``file.py`` for a mounted disk); ``restore.py`` rebuilds a state
directory from them and ``verify.py`` checks them with the restore's checks; ``lease.py`` keeps one writer
across machines. docs/REPLICATION.md.
"""
