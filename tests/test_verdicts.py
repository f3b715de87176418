"""The per-episode verdict stage, on records shaped as the watcher writes them."""

from __future__ import annotations

from agentprobe.verdicts import VerdictStage


def stage(existing: set[str], max_episodes: int = 4096) -> VerdictStage:
    def episode_of(path: str) -> str:
        parts = path.strip("/").split("/")
        return "/" + "/".join(parts[:2]) if len(parts) >= 2 else path

    return VerdictStage(episode_of, lambda p: p in existing, "node", 0, max_episodes)


def rec(type_: str, path: str, ts: int, **kw) -> dict:
    return {"type": type_, "ts": ts, "seq": ts, "cgroup": {"id": 7, "path": path}, **kw}


def test_a_verdict_when_the_episode_cgroup_goes():
    live = {"/agents/ep-1", "/agents/ep-2"}
    st = stage(live)
    st.process(rec("exec", "/agents/ep-1", 1, labels={"episode": "1"}))
    st.process(rec("exec", "/agents/ep-1/tool-3", 2, labels={"episode": "1", "TOOL_CALL_ID": "3"}))
    st.process(rec("alert", "/agents/ep-1/tool-3", 3, rule="stratum_protocol", priority="critical",
                   summary="s", labels={"TOOL_CALL_ID": "3"}))
    st.process(rec("response", "/agents/ep-1", 4, outcome="frozen", action="freeze", rule="stratum_protocol"))
    st.process(rec("exec", "/agents/ep-2", 5))
    assert st.poll_ended() == []
    live.discard("/agents/ep-1")
    (v,) = st.poll_ended()
    assert v["type"] == "verdict" and v["cgroup"]["path"] == "/agents/ep-1" and v["reason"] == "cgroup_removed"
    assert v["labels"] == {"episode": "1", "TOOL_CALL_ID": "3"}
    assert (v["clean"], v["alerts"], v["rules"], v["frozen"]) == (False, 1, {"stratum_protocol": 1}, True)
    assert v["first_alert"]["rule"] == "stratum_protocol" and v["first_alert"]["seq"] == 3
    assert v["events"] == {"exec": 2, "alert": 1, "response": 1} and (v["first_ts"], v["last_ts"]) == (1, 4)
    (rest,) = st.end_all()
    assert rest["cgroup"]["path"] == "/agents/ep-2" and rest["clean"] and rest["reason"] == "watcher_stopped"


def test_bounded_memory_and_meta_records_ignored():
    st = stage(set(), max_episodes=2)
    for i in range(5):
        st.process(rec("exec", f"/agents/ep-{i}", i))
    st.process({"type": "lost", "ts": 9})
    st.process(rec("exec", "", 10))
    assert len(st.episodes) == 2 and st.overflow == 3
    vs = st.poll_ended()
    assert len(vs) == 2 and all(v["overflow"] == 3 for v in vs)


def test_hostile_labels_stay_bounded():
    st = stage({"/a/b"})
    st.process(rec("exec", "/a/b", 1, labels={f"k{i}": "v" for i in range(50)}))
    (v,) = st.end_all()
    assert len(v["labels"]) == 16


def test_ended_episodes_are_looked_at_in_turn_within_a_budget():
    """Hundreds of open episodes: each call checks what fits in its time budget (at least one),
    and every removed episode gets exactly one verdict over the following calls."""
    live = {f"/agents/ep-{i}" for i in range(300)}
    checked = []

    def exists(p: str) -> bool:
        checked.append(p)
        return p in live

    st = VerdictStage(lambda p: p, exists, "node-1", 0)
    for i in range(300):
        st.process(rec("exec", f"/agents/ep-{i}", i))
    live.clear()
    assert len(st.poll_ended(budget_s=0.0)) == 1 and len(checked) == 1
    seen = []
    for _ in range(299):
        seen += [v["cgroup"]["path"] for v in st.poll_ended(budget_s=0.0)]
    assert len(seen) == 299 and len(set(seen)) == 299 and not st.episodes
    assert st.poll_ended() == []
