"""``hsm-proxy key generate`` and ``hsm-proxy csr``: a key pair in the token, then its request.

Theory of operation. The first steps of a deployment, on a token that holds nothing yet:
``key generate`` makes a serving key pair inside the token (pkcs11/keygen.py) and prints
its RFC 7512 URI on standard output, for the config and for ``csr``; ``csr`` writes a
PKCS#10 request for a token key, signed inside the token (tls/csr.py, with the subject and
SANs parsed by tls/x509names.py), as PEM on standard output, for the CA. This module holds
their arguments (:func:`add_parsers`, called by cli.py) and their wiring; every input is
checked before the token is touched, and the PIN comes from a file, a variable or the
config's reference, never from the command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.errors import ConfigError

if TYPE_CHECKING:
    from proxy.config import ProxyConfig, TokenConfig
    from proxy.pkcs11.uri import KeyURI


def add_parsers(commands: Any) -> None:
    """Add ``key`` (with ``generate``) and ``csr`` to cli.py's subcommands."""
    key = commands.add_parser("key", help="make key pairs inside a token")
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="KEY-COMMAND")
    generate = key_commands.add_parser(
        "generate",
        help="generate a key pair inside a token: sensitive, never extractable, sign only; "
        "prints its PKCS#11 URI",
    )
    generate.add_argument("--module", required=True, help="path of the PKCS#11 module (.so)")
    generate.add_argument("--token", required=True, metavar="LABEL", help="the token's label")
    generate.add_argument(
        "--label", required=True, metavar="NAME", help="the new key's label (CKA_LABEL)"
    )
    generate.add_argument(
        "--id",
        metavar="HEX",
        help="the new key's ID (CKA_ID) as hex digits, two per byte (default: the SHA-1 of "
        "the public key, the certificate's subject key identifier)",
    )
    kind = generate.add_mutually_exclusive_group(required=True)
    kind.add_argument("--ec", metavar="CURVE", help="an EC key on P-256 or P-384")
    kind.add_argument("--rsa", metavar="BITS", help="an RSA key of 2048, 3072 or 4096 bits")
    _pin_arguments(generate)

    request = commands.add_parser(
        "csr",
        help="write a certificate signing request (PKCS#10, PEM) for a token key, signed "
        "inside the token",
    )
    source = request.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config",
        type=Path,
        help="take the module, the PIN and (without --key) the key from this config",
    )
    source.add_argument("--module", help="path of the PKCS#11 module (.so)")
    request.add_argument(
        "--token", metavar="LABEL", help="the token's label (with --module, if --key has none)"
    )
    request.add_argument(
        "--key",
        metavar="URI",
        help="the key's PKCS#11 URI, as `key generate` prints it (with --config: default tls.key)",
    )
    request.add_argument(
        "--subject",
        required=True,
        help='the subject as an RFC 4514 string, e.g. "CN=web.example.com,O=Example"',
    )
    request.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="TYPE:VALUE",
        help="a subjectAltName: DNS:web.example.com, IP:192.0.2.10 or URI:spiffe://...; "
        "repeat for more",
    )
    request.add_argument(
        "--rsa-pss",
        action="store_true",
        help="sign an RSA key's request with RSA-PSS (default: PKCS#1 v1.5, which every CA takes)",
    )
    _pin_arguments(request)


def _pin_arguments(parser: argparse.ArgumentParser) -> None:
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--pin-file", type=Path, help="file holding the token's user PIN")
    pin.add_argument("--pin-env", metavar="VARIABLE", help="environment variable holding it")


def _pin_source(args: argparse.Namespace) -> Any:
    from proxy.secrets.store import PinSource

    if args.pin_file is None and args.pin_env is None:
        return None
    return PinSource(file=args.pin_file, env=args.pin_env)


def key_generate(args: argparse.Namespace) -> int:
    from proxy.pkcs11.keygen import (
        check_key_label,
        create_serving_key,
        ec_kind,
        parse_key_id,
        rsa_kind,
    )
    from proxy.secrets.store import read_pin

    kind = ec_kind(args.ec) if args.ec is not None else rsa_kind(args.rsa)
    key_id = parse_key_id(args.id) if args.id is not None else None
    check_key_label(args.label)
    source = _pin_source(args)
    if source is None:
        raise ConfigError("give the token's user PIN with --pin-file FILE or --pin-env VARIABLE")
    generated = create_serving_key(
        args.module, args.token, read_pin(source), args.label, key_id, kind
    )
    print(generated.uri, flush=True)
    origin = " (the SHA-1 of the public key)" if generated.id_derived else ""
    print(
        f"hsm-proxy: generated {kind} key pair {args.label!r} in token "
        f"{generated.uri.token!r}, id {generated.info.id.hex()}{origin}: the private key is "
        "sensitive, never extractable and signs only; the public key only verifies",
        file=sys.stderr,
    )
    return 0


def _token_holding(config: ProxyConfig, key: KeyURI) -> TokenConfig:
    """The token table of ``config`` that ``key`` is in: the ``[tls.sni.token]`` of an
    entry whose key it is, or whose key is in the same token, else ``[token]``."""
    for site in config.tls.sni:
        if site.token is not None and (
            site.key == key or (key.token is not None and site.key.token == key.token)
        ):
            return site.token
    return config.token


def csr(args: argparse.Namespace) -> int:
    from proxy.config import load_config
    from proxy.ops.logs import audit_signature, connection_context
    from proxy.pkcs11.token import Token
    from proxy.pkcs11.uri import parse_key_uri
    from proxy.secrets.store import read_pin
    from proxy.tls.csr import build_request, request_pem
    from proxy.tls.x509names import parse_sans, parse_subject

    subject = parse_subject(args.subject)
    sans = parse_sans(args.san)
    key = parse_key_uri(args.key) if args.key is not None else None
    pin_source = _pin_source(args)
    if args.config is not None:
        if args.token is not None:
            raise ConfigError("--token goes with --module; with --config, the key URI names it")
        config = load_config(args.config)
        key = key or config.tls.key
        token_config = _token_holding(config, key)
        module = token_config.module
        pin_source = pin_source or token_config.pin
    else:
        module = args.module
        if key is None:
            raise ConfigError("--key URI is needed with --module (the URI `key generate` printed)")
        if pin_source is None:
            raise ConfigError(
                "give the token's user PIN with --pin-file FILE or --pin-env VARIABLE"
            )
    if args.token is not None:
        if key.token not in (None, args.token):
            raise ConfigError(
                f"--token {args.token!r} and the key URI's token={key.token!r} differ"
            )
        key = replace(key, token=args.token)
    pin = read_pin(pin_source)
    purpose = connection_context.set({"purpose": "csr"})
    try:
        with Token(module, key, pin, pool_size=1, observer=audit_signature) as token:
            request = build_request(
                subject, sans, token.find_private_key(key), rsa_pss=args.rsa_pss
            )
    finally:
        connection_context.reset(purpose)
    sys.stdout.write(request_pem(request))
    sys.stdout.flush()
    if not sans:
        print(
            "hsm-proxy: warning: the request has no --san; TLS clients match server names "
            "against the subjectAltName, not the CN",
            file=sys.stderr,
        )
    return 0
