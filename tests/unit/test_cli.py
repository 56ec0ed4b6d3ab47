"""`vllm-ascend-pd` parsing and dispatch: demo, proxy, up (the plan)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from vllm_ascend_pd.cli import build_parser, main
from vllm_ascend_pd.cli import topology
from vllm_ascend_pd.cli.topology import KV_STRIDE, PlanError, make_plan
from vllm_ascend_pd.cli.up import plan_from_args


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == "vllm-ascend-pd 0.1.0"


def test_demo_parsing():
    args = parse("demo", "--work-dir", "/tmp/x")
    assert args.command == "demo" and args.work_dir == "/tmp/x"
    assert args.run.__module__ == "vllm_ascend_pd.cli.demo"


def test_proxy_help_is_the_proxy_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["proxy", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prefill", "--decode", "--register-port", "--policy"):
        assert flag in out


def test_proxy_validates_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["proxy", "--port", "0"])
    assert e.value.code == 2
    assert "no prefill instance: set --prefill host:port" in capsys.readouterr().err


def test_up_parsing_and_vllm_args_after_double_dash():
    args = parse("up", "--model", "/m", "--prefill", "2", "--decode", "3", "--tp", "2",
                 "--port", "9000", "--devices", "4,5,6,7", "--kv-extra", '{"transport": "tcp"}',
                 "--proxy-arg=--policy=least_tokens", "--", "--dtype", "float16", "--port", "1")
    assert (args.model, args.prefill, args.decode, args.tp, args.port) == ("/m", 2, 3, 2, 9000)
    assert args.devices == [4, 5, 6, 7]
    assert args.kv_extra == {"transport": "tcp"}
    assert args.proxy_arg == ["--policy=least_tokens"]
    assert args.vllm_args == ["--", "--dtype", "float16", "--port", "1"]


def test_up_help_shows_real_defaults_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["up", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    # --model is required, --served-model-name defaults to --model, --kv-port to a free one.
    assert "(default: None)" not in out and "(default: [])" not in out
    assert "--served-model-name SERVED_MODEL_NAME default: --model --device" in out
    assert "the proxy's HTTP port (0: any free port) (default: 8000)" in out
    assert "(default: pd-up-logs)" in out


@pytest.mark.parametrize("argv, msg", [
    (["--devices", "0,x"], "expected device ids"),
    (["--kv-extra", "[1]"], "expected a JSON object"),
    (["--kv-extra", "{bad"], "not JSON"),
])
def test_up_rejects_bad_flags(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse("up", "--model", "m", *argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_up_cpu_plan_uses_the_test_settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = parse("up", "--model", "/m", "--prefill", "2", "--decode", "1", "--device", "cpu",
                 "--port", "0", "--served-model-name", "tiny", "--", "--dtype", "float32")
    plan = plan_from_args(args)
    assert [i.name for i in plan.instances] == ["prefill-0", "prefill-1", "decode-0"]
    assert [i.role for i in plan.instances] == ["kv_producer", "kv_producer", "kv_consumer"]
    kvs = [i.kv_port for i in plan.instances]
    assert kvs == [kvs[0], kvs[0] + KV_STRIDE, kvs[0] + 2 * KV_STRIDE]
    ports = {plan.proxy_port, *(i.http_port for i in plan.instances)}
    assert len(ports) == 4 and not any(kvs[0] <= p < kvs[0] + 3 * KV_STRIDE for p in ports)
    for inst in plan.instances:
        argv = inst.argv
        assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        # In-process engine + uni executor + eager: docs/known-issues.md;
        # 1 GiB of KV cache, or the second instance cannot reserve its memory.
        assert inst.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        assert "--distributed-executor-backend" in argv and argv[argv.index("--distributed-executor-backend") + 1] == "uni"
        assert "--enforce-eager" in argv and "--tensor-parallel-size" not in argv
        assert argv[-2:] == ["--dtype", "float32"]
        assert argv[argv.index("--served-model-name") + 1] == "tiny"
        kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        assert kv == {"kv_connector": "AscendSimpleConnector", "kv_role": inst.role,
                      "kv_port": inst.kv_port, "kv_connector_extra_config": {"kv_ip": "127.0.0.1"}}
        assert inst.devices == []
    p = plan.proxy_argv
    assert p[p.index("--port") + 1] == str(plan.proxy_port) and p[p.index("--model") + 1] == "tiny"
    pre = [f"127.0.0.1:{i.http_port}" for i in plan.by_role("kv_producer")]
    dec = [f"127.0.0.1:{i.http_port}" for i in plan.by_role("kv_consumer")]
    assert p[p.index("--prefill") + 1:p.index("--decode")] == pre
    assert p[p.index("--decode") + 1:] == dec


@pytest.mark.parametrize("env, vllm_args", [
    ({"VLLM_CPU_KVCACHE_SPACE": "4"}, []),
    ({}, ["--gpu-memory-utilization", "0.3"]),
    ({}, ["--gpu_memory_utilization=0.3"]),
    ({}, ["--kv-cache-memory-bytes", "2G"]),
])
def test_up_cpu_leaves_memory_the_user_sized_alone(env, vllm_args):
    # vllm-cpu reserves 92% of the host's memory per instance by default, so
    # `up --prefill 1 --decode 1` (the README's command) failed to start the
    # second instance; `up` now sets VLLM_CPU_KVCACHE_SPACE=1 unless the user
    # sized the memory, which the environment variable would override.
    plan = make_plan(model="/m", n_prefill=1, n_decode=1, proxy_port=0, env=env, vllm_args=vllm_args)
    for inst in plan.instances:
        assert inst.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        assert inst.argv[len(inst.argv) - len(vllm_args):] == vllm_args
    plan = make_plan(model="/m", n_prefill=1, n_decode=1, proxy_port=0,
                     env={"VLLM_CPU_KVCACHE_SPACE": ""}, vllm_args=["--dtype", "float32"])
    assert [i.env["VLLM_CPU_KVCACHE_SPACE"] for i in plan.instances] == ["1", "1"]
    npu = make_plan(model="/m", n_prefill=1, n_decode=1, device="npu", proxy_port=0, env={})
    assert not any("VLLM_CPU_KVCACHE_SPACE" in i.env for i in npu.instances)


def test_an_ipv6_host_gives_addresses_the_proxy_and_clients_accept():
    # `up --host ::1` passed the proxy "--prefill ::1:PORT" (it refuses that:
    # expected host:port) and waited on http://::1:PORT/health.
    from vllm_ascend_pd.proxy.config import parse_address

    plan = make_plan(model="/m", n_prefill=1, n_decode=1, host="::1", proxy_port=8000)
    assert plan.proxy_url == "http://[::1]:8000"
    [pre], [dec] = plan.by_role("kv_producer"), plan.by_role("kv_consumer")
    assert plan.url_of(pre) == f"http://[::1]:{pre.http_port}"
    p = plan.proxy_argv
    assert p[p.index("--host") + 1] == "::1"
    assert p[p.index("--prefill") + 1:p.index("--decode")] == [f"[::1]:{pre.http_port}"]
    assert parse_address(p[p.index("--decode") + 1]) == ("::1", dec.http_port)
    kv = json.loads(pre.argv[pre.argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"] == {"kv_ip": "::1"}


def test_npu_plan_assigns_consecutive_devices(monkeypatch):
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    plan = make_plan(model="/m", n_prefill=2, n_decode=1, tp=2, device="npu", proxy_port=0,
                     kv_port=20000, kv_extra={"transport": "hccl"}, proxy_args=["--policy", "least_tokens"])
    assert [i.devices for i in plan.instances] == [[0, 1], [2, 3], [4, 5]]
    assert [i.env["ASCEND_RT_VISIBLE_DEVICES"] for i in plan.instances] == ["0,1", "2,3", "4,5"]
    assert [i.kv_port for i in plan.instances] == [20000, 20000 + KV_STRIDE, 20000 + 2 * KV_STRIDE]
    for inst in plan.instances:
        assert inst.argv[inst.argv.index("--tensor-parallel-size") + 1] == "2"
        assert "--distributed-executor-backend" not in inst.argv
        kv = json.loads(inst.argv[inst.argv.index("--kv-transfer-config") + 1])
        assert kv["kv_connector_extra_config"] == {"kv_ip": "127.0.0.1", "transport": "hccl"}
    assert plan.proxy_argv[-2:] == ["--policy", "least_tokens"]


def test_npu_device_pool_from_env_and_flag():
    env = {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}
    assert topology.device_pool(None, env) == [4, 5, 6, 7]
    assert topology.device_pool([2, 3], env) == [2, 3]
    assert topology.device_pool(None, {}) is None
    assert topology.assign_devices(2, 2, [4, 5, 6, 7]) == [[4, 5], [6, 7]]
    with pytest.raises(PlanError, match="not a comma-separated list"):
        topology.device_pool(None, {"ASCEND_RT_VISIBLE_DEVICES": "a,b"})


@pytest.mark.parametrize("kw, msg", [
    (dict(n_prefill=2, n_decode=2, tp=2, device="npu", devices=[0, 1, 2, 3, 4, 5]),
     "4 instances x --tp 2 need 8 NPUs but only 6 are available"),
    (dict(n_prefill=1, n_decode=1, tp=1, device="npu", devices=[0, 0]), "repeats a device"),
    (dict(n_prefill=1, n_decode=1, tp=2, device="cpu"), "--tp > 1 needs NPUs"),
    (dict(n_prefill=0, n_decode=1), "at least one prefill and one decode"),
    (dict(n_prefill=1, n_decode=1, kv_port=65400), "leaves no room"),
])
def test_plan_errors_say_what_to_change(kw, msg):
    with pytest.raises(PlanError, match=re.escape(msg)):
        make_plan(model="/m", proxy_port=0, **kw)


def test_up_plan_error_exits_2_before_starting_anything(tmp_path, capsys):
    code = main(["up", "--model", "/m", "--device", "cpu", "--tp", "2", "--log-dir", str(tmp_path / "logs")])
    assert code == 2
    assert "--tp > 1 needs NPUs" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_up_busy_proxy_port_exits_2_before_starting_anything(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = main(["up", "--model", "/m", "--device", "cpu", "--port", str(port),
                     "--log-dir", str(tmp_path / "logs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"the proxy port 127.0.0.1:{port} is not free" in err and "--port 0" in err
    assert not (tmp_path / "logs").exists()
