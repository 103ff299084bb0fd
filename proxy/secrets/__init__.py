"""Secret sources: where PINs, certificate chains, ticket keys, the client CA bundle and the
OCSP staple come from, and whether they changed.

One interface, one module per source (as ghostunnel's certloader/ does for certificates):

* source.py    the :class:`~proxy.secrets.source.SecretSource` protocol (describe,
               version, read, watch) and what a source is given (ReadContext, Watch);
* file.py      ``file:PATH`` (and plain paths): stat versions, private-file checks;
* env.py       ``env:NAME``: read at start and on SIGHUP, never polled;
* aws.py       ``aws-sm:ID-or-ARN``: AWS Secrets Manager, AWSCURRENT versions;
* reference.py the reference form and its strict parser; :class:`SecretRef`;
* store.py     :class:`SecretStore` (reads through the sources) and :func:`read_pin`.
"""
