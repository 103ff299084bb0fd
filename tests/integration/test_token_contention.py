"""Several processes of one host logging in to one SoftHSM2 token at the same moment, as
``--workers`` siblings do when a SIGHUP or a secret change makes them all reload at once.

SoftHSM2 rewrites the token's file at every login; a process that reads the token meanwhile
gets CKR_GENERAL_ERROR or sees no token. Finding the token and logging in must ride that
out (proxy/pkcs11/module.py: select_token, patiently), or a reload fails on one worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proxy.commands.devstate import find_softhsm_module
from tests.support import REPO

PIN = "contended-1234"

# Each process finds the token and logs in (then out) 60 times, a random moment of up to
# 20 ms apart, as processes that reload now and then do (a tight loop in three processes
# rewrites the token file so often that one of them may never see it whole); it prints how
# many of its rounds failed, and the first reasons.
_HAMMER = """
import os, random, time
from proxy.errors import ProxyError
from proxy.pkcs11.login import _log_in
from proxy.pkcs11.module import select_token
from proxy.pkcs11.uri import KeyURI

module, pin = os.environ["HAMMER_MODULE"], os.environ["HAMMER_PIN"]
failures, rounds = [], 60
for _ in range(rounds):
    try:
        _log_in(select_token(module, KeyURI(token="contended")), pin).close()
    except ProxyError as error:
        failures.append(str(error))
    time.sleep(random.uniform(0, 0.02))
print(rounds, len(failures), failures[:3])
"""


def test_concurrent_logins_of_several_processes_neither_lose_the_token_nor_fail(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "PYTHONPATH": str(REPO)}
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "contended",
            "--so-pin",
            "so-5678",
            "--pin",
            PIN,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    env |= {"HAMMER_MODULE": find_softhsm_module(), "HAMMER_PIN": PIN}
    hammers = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    reports = [hammer.communicate(timeout=60)[0].split(" ", 2) for hammer in hammers]
    assert all(hammer.returncode == 0 for hammer in hammers), reports
    assert [int(failed) for _, failed, _ in reports] == [0, 0, 0], reports
