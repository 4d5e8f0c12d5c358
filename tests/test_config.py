"""Tier 1: the cluster config file and `clusterfs keygen`."""

from __future__ import annotations

import os
import stat

import pytest

from clusterfs.cli import main as cli_main
from clusterfs.config import decode_key, load_config
from clusterfs.errors import ConfigError

GOOD = """
name = "dev"
key_file = "cluster.key"

[timeouts]
heartbeat_interval = 0.25
failure_timeout = 2

[storage]
group = [1, 2]

[[node]]
id = 1
name = "alpha"
address = "127.0.0.1:7001"

[[node]]
id = 2
name = "beta"
address = "127.0.0.2:7002"

[[node]]
id = 4294967295
name = "gamma"
address = "[::1]:7003"
"""

KEY = "ab" * 32


def write(tmp_path, text, key=KEY):
    if key is not None:
        (tmp_path / "cluster.key").write_text(key + "\n")
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def test_good_file_parses(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.name == "dev"
    assert cfg.key == bytes.fromhex(KEY)
    assert cfg.node_ids == (1, 2, 4294967295)
    assert cfg.node(2).host == "127.0.0.2" and cfg.node(2).port == 7002
    assert cfg.node(4294967295).host == "::1"
    assert cfg.node(4294967295).address == "[::1]:7003"
    assert cfg.heartbeat_interval == 0.25 and cfg.failure_timeout == 2.0
    assert cfg.storage_group == (1, 2)
    assert cfg.size == 3


def test_defaults_and_inline_key(tmp_path):
    text = f'key = "{KEY}"\n[[node]]\nid = 7\naddress = "127.0.0.1:9"\n'
    cfg = load_config(write(tmp_path, text, key=None))
    assert cfg.heartbeat_interval == 0.5 and cfg.failure_timeout <= 5.0
    assert cfg.dead_on_refusal
    assert cfg.node(7).name == "node7"
    off = load_config(write(tmp_path, text.replace("[[node]]", "[timeouts]\n"
                                                   "dead_on_refusal = false\n[[node]]"),
                            key=None))
    assert not off.dead_on_refusal
    # suspicion (docs/cluster.md): a lock answer owed 1 s (a quarter of a shorter
    # failure timeout), the probe's deadline membership's default unless set
    assert cfg.answer_timeout == min(1.0, cfg.failure_timeout / 4)
    assert cfg.probe_timeout is None
    set_ = load_config(write(tmp_path, text.replace("[[node]]", "[timeouts]\n"
                                                    "answer_timeout = 0.5\n"
                                                    "probe_timeout = 2\n[[node]]"),
                             key=None))
    assert set_.answer_timeout == 0.5 and set_.probe_timeout == 2.0


def _replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize("text, message", [
    (_replace('"127.0.0.2:7002"', '"127.0.0.2:70000"'), "node[1].address: port 70000 out of range"),
    (_replace("id = 2", "id = 1"), "node[1].id: duplicate id 1"),
    (_replace("id = 4294967295", "id = 4294967296"), "node[2].id: 4294967296 out of range"),
    (_replace("id = 2", "id = -1"), "node[1].id: -1 out of range"),
    (_replace("id = 2", 'id = "two"'), "node[1].id: must be an integer"),
    (_replace('"127.0.0.2:7002"', '"127.0.0.2"'), "node[1].address: bad address"),
    (_replace('"127.0.0.2:7002"', '"127.0.0.2:x"'), "node[1].address: bad port"),
    (_replace('"127.0.0.2:7002"', '"127.0.0.1:7001"'), "node[1].address: duplicate address"),
    (_replace('name = "beta"', 'name = "alpha"'), "node[1].name: duplicate name"),
    (_replace('name = "beta"\n', 'name = "beta"\ncolour = 3\n'), "node[1].colour: unknown"),
    (_replace('address = "127.0.0.2:7002"\n', ""), "node[1].address: missing"),
    (_replace("id = 2\n", ""), "node[1].id: missing"),
    (_replace("failure_timeout = 2", "failure_timeout = 0.3"), "timeouts.failure_timeout"),
    (_replace("failure_timeout = 2", 'failure_timeout = "soon"'), "timeouts.failure_timeout:"),
    (_replace("failure_timeout = 2", "failure_timeout = 2\ndead_on_refusal = 1"),
     "timeouts.dead_on_refusal: must be true or false"),
    (_replace("heartbeat_interval = 0.25", "heartbeat_interval = 0"),
     "timeouts.heartbeat_interval: 0 out of range"),
    (_replace("failure_timeout = 2", "failure_timeout = 2\nanswer_timeout = 1.5"),
     "timeouts.answer_timeout: 1.5 s must be at most half of failure_timeout"),
    (_replace("failure_timeout = 2", "failure_timeout = 2\nprobe_timeout = 0.1"),
     "timeouts.probe_timeout: 0.1 s must be at least heartbeat_interval"),
    (_replace("failure_timeout = 2", "failure_timeout = 2\nprobe_timeout = 3"),
     "timeouts.probe_timeout: 3.0 s must be at least"),
    (_replace('key_file = "cluster.key"', 'key_file = "nope.key"'), "key_file: not found"),
    (_replace("group = [1, 2]", "group = [9]"), "storage.group: 9 is not a configured"),
    (_replace('name = "dev"', 'name = "dev"\nflavour = 1'), "flavour: unknown field"),
    ("name = [", "config:"),
    ('key_file = "cluster.key"\n', "node: at least one"),
])
def test_bad_field_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert message in str(ei.value)


def test_bad_key_contents(tmp_path):
    with pytest.raises(ConfigError, match="key_file: key is 3 bytes"):
        load_config(write(tmp_path, GOOD, key="abcdef"))
    with pytest.raises(ConfigError, match="key_file: not hex or base64"):
        load_config(write(tmp_path, GOOD, key="!!not a key!!"))
    with pytest.raises(ConfigError, match="key: give key or key_file"):
        load_config(write(tmp_path, f'key = "{KEY}"\n' + GOOD))


def test_keygen_writes_0600_key(tmp_path):
    out = tmp_path / "k"
    assert cli_main(["keygen", "-o", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = decode_key(out.read_text(), "k")
    assert len(key) == 32
    # refuses to overwrite without -f; base64 form also loads
    assert cli_main(["keygen", "-o", str(out)]) == 1
    assert cli_main(["keygen", "-o", str(out), "-f", "--base64"]) == 0
    key2 = decode_key(out.read_text(), "k")
    assert len(key2) == 32 and key2 != key
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    # and a config using it loads
    cfg = load_config(write(tmp_path, GOOD.replace("cluster.key", str(out)), key=None))
    assert cfg.key == key2
