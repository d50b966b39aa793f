"""The pure helpers of the OPC UA peer benchmark (tests/benchmarks/opcua_peers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

import opcua_peers


def test_prom_total_sums_every_series_of_one_counter_only() -> None:
    text = "\n".join(
        [
            "# HELP edgetwin_samples_total samples taken in per stream",
            "# TYPE edgetwin_samples_total counter",
            'edgetwin_samples_total{source="plc",metric="Pump1/Bench/Item0000"} 1200.0',
            'edgetwin_samples_total{source="plc",metric="Pump1/Bench/Item0001"} 34.0',
            'edgetwin_samples_total_created{source="plc",metric="Pump1/Bench/Item0000"} 1.7e9',
            "edgetwin_samples_totally 5.0",
            'edgetwin_stream_dropped_total{source="plc"} 7.0',
        ]
    )
    assert opcua_peers.prom_total(text, "edgetwin_samples_total") == 1234.0
    assert opcua_peers.prom_total(text, "edgetwin_windows_total") == 0.0


def test_nodered_flow_wires_only_to_nodes_it_defines() -> None:
    mqtt = {"host": "127.0.0.1", "port": 8883, "ca": "/ca", "cert": "/c", "key": "/k"}
    ids = ["ns=2;s=Pump1.Bench.Item0000", "ns=2;s=Pump1.Bench.Item0001"]
    flow = opcua_peers.nodered_flow("opc.tcp://127.0.0.1:4840", ids, 50, mqtt)
    by_id = {n["id"]: n for n in flow}
    assert len(by_id) == len(flow)
    targets = {t for n in flow for out in n.get("wires", []) for t in out}
    assert targets <= set(by_id)
    refs = {
        n[k]
        for n in flow
        for k in ("z", "endpoint", "broker", "tls")
        if k in n and n["type"] != "OpcUa-Endpoint"
    }
    assert refs - {"127.0.0.1"} <= set(by_id)
    client = by_id["bench-client"]
    assert (client["action"], client["time"], client["timeUnit"]) == ("subscribe", "50", "ms")
    assert by_id["bench-mqtt"]["qos"] == "1"
    assert by_id["bench-broker"]["usetls"] is True
    inject = by_id["bench-inject"]
    assert inject["topic"] == "multiple"
    assert '"ns=2;s=Pump1.Bench.Item0001"' in inject["payload"]


def test_pump_model_maps_every_input_of_the_card_to_a_bench_item() -> None:
    import json  # noqa: PLC0415

    card = json.loads((Path(__file__).resolve().parents[1] / "models" / "pump_skab.card.json").read_text())
    for metric in {i["metric"] for i in card["inputs"]}:
        assert f'{metric} = "Pump1/Bench/Item' in opcua_peers.PUMP_MODEL


def test_sum_sent_counts_only_the_sockets_of_one_process() -> None:
    out = (
        '0 0 127.0.0.1:40000 127.0.0.1:8883 users:(("python",pid=41,fd=7))\n'
        "\t cubic rto:204 bytes_sent:1500 bytes_acked:1500 bytes_received:90\n"
        '0 0 127.0.0.1:40001 127.0.0.1:8883 users:(("node",pid=4100,fd=9))\n'
        "\t cubic rto:204 bytes_sent:999999 bytes_acked:999999\n"
        '0 0 127.0.0.1:40002 127.0.0.1:8883 users:(("python",pid=41,fd=8))\n'
        "\t cubic rto:204 bytes_sent:25 bytes_acked:25\n"
        '0 0 127.0.0.1:40003 127.0.0.1:8883 users:(("python",pid=41,fd=9))\n'
        "\t cubic rto:204 bytes_received:7\n"
    )
    assert opcua_peers.sum_sent(out, 41) == 1525
    assert opcua_peers.sum_sent(out, 4100) == 999999
    assert opcua_peers.sum_sent(out, 4) == 0
