"""Real tritonservers on free 127.0.0.1 ports, started once per session, their logs shown on failure.

`triton` serves `audio_tokenizer` and `vocoder` (one server each); `triton_vocoder2` is a second,
independent vocoder server (another replica) for streams continued elsewhere. `model_services` is
the four model services, one server each, that the modules running an orchestrator with the
default model settings share (llm frees an idle call's row after 30 s); a test may restart one of
them (`Cluster.restart`, same ports). All point the `checkpoint` parameter at the session's tiny
checkpoint (`tests/conftest.py: tiny_checkpoint`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from funchat.dev.tritonserver import Cluster, start_servers

_CLUSTERS: list[Cluster] = []  # running clusters, whose logs a failing test report shows


@pytest.fixture(scope="session")
def _servers(tiny_checkpoint, tmp_path_factory) -> dict[str, Cluster]:
    params = {"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"}}
    jobs = {
        "main": dict(models=["audio_tokenizer", "vocoder"], run_dir=tmp_path_factory.mktemp("triton-main")),
        "vocoder2": dict(models=["vocoder"], run_dir=tmp_path_factory.mktemp("triton-vocoder2")),
    }
    # Both clusters start at the same time (start_servers blocks until its servers are ready).
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(start_servers, params=params, timeout=120, **job) for k, job in jobs.items()}
        clusters, errors = {}, []
        for key, future in futures.items():
            try:
                clusters[key] = future.result()
            except Exception as exc:  # TritonServerError holds the log tail
                errors.append(f"{key}: {exc}")
    if errors:
        for cluster in clusters.values():
            cluster.stop()
        pytest.fail("tritonserver did not start:\n" + "\n".join(errors), pytrace=False)
    _CLUSTERS.extend(clusters.values())
    yield clusters
    for cluster in clusters.values():
        cluster.stop()
        _CLUSTERS.remove(cluster)


@pytest.fixture(scope="session")
def model_services(tiny_checkpoint, tmp_path_factory) -> Cluster:
    params = {"*": {"checkpoint": str(tiny_checkpoint), "threads": "1"}, "llm": {"idle_timeout_s": "30"}}
    try:
        cluster = start_servers(params=params, run_dir=tmp_path_factory.mktemp("model-services"), timeout=180)
    except Exception as exc:  # TritonServerError holds the log tail
        pytest.fail(f"the model services did not start:\n{exc}", pytrace=False)
    _CLUSTERS.append(cluster)
    yield cluster
    cluster.stop()
    _CLUSTERS.remove(cluster)


@pytest.fixture(scope="session")
def triton(_servers) -> Cluster:
    return _servers["main"]


@pytest.fixture(scope="session")
def triton_vocoder2(_servers) -> Cluster:
    return _servers["vocoder2"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _CLUSTERS:
        for cluster in _CLUSTERS:
            for model, server in cluster.servers.items():
                alive = "running" if cluster.alive(model) else "EXITED"
                report.sections.append((f"tritonserver {model} ({server.grpc}, {alive}) log tail: {server.log}",
                                        cluster.log_tail(model, 80)))
