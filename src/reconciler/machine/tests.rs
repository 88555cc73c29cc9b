use std::time::Duration;

use super::*;
use crate::kernel::KernelRelease;
use crate::kmod::ModName;
use crate::reconciler::outcome::{ModuleAction, StepError};

use Status::{
    Busy, Failed, Fetching, Inactive, Invalid, Loaded, Loading, Unloading, Unsupported, Verifying,
};

const CTX: Ctx = Ctx {
    now: 100,
    retry_delay: Duration::from_secs(5),
};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn action(name: &str, action: Action) -> ModuleAction {
    ModuleAction {
        name: ModName::parse(name).unwrap(),
        path: format!("/x/{name}.ko").into(),
        action,
        params: Vec::new(),
    }
}

fn outcome(state: State, error: Option<Step>, actions: &[(&str, Action)]) -> Box<Outcome> {
    let mut o = Outcome::new("m", &KernelRelease::parse("6.1.0-1-amd64").unwrap());
    o.state = state;
    o.error = error.map(|step| StepError {
        step,
        message: format!("{} broke", step.as_str()),
    });
    o.modules = actions.iter().map(|(n, a)| action(n, *a)).collect();
    Box::new(o)
}

/// A typical model in `status`: wanted, with a good config (none when invalid).
fn model(status: Status) -> Module {
    let mut m = Module::new("f.toml".into(), Ok(("d1".into(), s(&["m"]))), true, 10);
    m.status = status;
    m.started_op = 3;
    m.completed_op = 3;
    match status {
        Invalid => {
            m.digest = None;
            m.configured.clear();
            m.config_error = Some("bad".into());
            m.error = "bad".into();
        }
        Loaded => {
            m.owned = s(&["m"]);
            m.recorded = true;
        }
        Failed => {
            m.retry = Some(Operation::Load);
            m.attempts = 1;
            m.next_retry = 50;
        }
        Busy => {
            m.owned = s(&["m"]);
            m.recorded = true;
            m.retry = Some(Operation::Reload);
            m.attempts = 1;
            m.next_retry = 50;
        }
        Fetching | Verifying | Loading | Unloading => m.started_op = 4,
        Inactive | Unsupported => {}
    }
    m
}

/// The kinds of event the table covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum E {
    Load,
    Unload,
    Reload,
    Changed,
    Invalid,
    Removed,
    Restored,
    Waiting,
    Started,
    Progress,
    DoneOk,
    DoneFailed,
    Retry,
    Shutdown,
}

const EVENTS: [E; 14] = [
    E::Load,
    E::Unload,
    E::Reload,
    E::Changed,
    E::Invalid,
    E::Removed,
    E::Restored,
    E::Waiting,
    E::Started,
    E::Progress,
    E::DoneOk,
    E::DoneFailed,
    E::Retry,
    E::Shutdown,
];

/// The model and event of one table case.
fn case(status: Status, e: E) -> (Module, Event) {
    let mut m = model(status);
    let ev = match e {
        E::Load => Event::LoadRequested { seq: 7 },
        E::Unload => Event::UnloadRequested { seq: 7 },
        E::Reload => Event::ReloadRequested { seq: 7 },
        E::Changed => Event::ConfigChanged {
            file: "f.toml".into(),
            digest: "d2".into(),
            modules: s(&["m"]),
            seq: 7,
        },
        E::Invalid => Event::ConfigInvalid {
            file: "f.toml".into(),
            error: "oops".into(),
        },
        E::Removed => Event::ConfigRemoved { seq: 7 },
        E::Restored => Event::Restored {
            recorded: true,
            live: Some((5, s(&["m"]))),
        },
        E::Waiting => {
            m.queue.push_back((Operation::Load, 7));
            Event::Waiting { on: s(&["first"]) }
        }
        E::Started => {
            m.queue.push_back((Operation::Load, 7));
            Event::WorkStarted {
                op: Operation::Load,
                seq: 7,
            }
        }
        E::Progress => Event::StepProgress(Step::Fetch),
        E::DoneOk => Event::WorkDone {
            op: Operation::Load,
            seq: 4,
            ran: Ran::Load,
            outcome: outcome(State::Loaded, None, &[("m", Action::Inserted)]),
        },
        E::DoneFailed => Event::WorkDone {
            op: Operation::Load,
            seq: 4,
            ran: Ran::Load,
            outcome: outcome(State::Failed, Some(Step::Verify), &[]),
        },
        E::Retry => Event::RetryDue { seq: 7 },
        E::Shutdown => Event::Shutdown {
            unload_seq: Some(7),
        },
    };
    (m, ev)
}

/// What a case must give.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Taken: the status after, and the effects in order.
    Ok(Status, Vec<Effect>),
    /// Refused, for this reason.
    No(Refused),
}

fn ok(status: Status, fx: &[Effect]) -> Want {
    Want::Ok(status, fx.to_vec())
}

fn not_now(status: Status, e: E) -> Want {
    let (_, ev) = case(status, e);
    Want::No(Refused::NotNow {
        status,
        event: ev.name(),
    })
}

const SAVE: Effect = Effect::SaveDesired;
const FORGET: Effect = Effect::Forget;
const A3: Effect = Effect::Answer(3);
const A7: Effect = Effect::Answer(7);

const LOAD: Effect = Effect::Queued(Operation::Load, 7);
const UNLOAD: Effect = Effect::Queued(Operation::Unload, 7);
const RELOAD: Effect = Effect::Queued(Operation::Reload, 7);
const RUN: Effect = Effect::Run(Operation::Load, 7);
const ARM: Effect = Effect::ArmRetry(Duration::from_secs(5));

/// Every status × every event, written out.
#[allow(clippy::too_many_lines)]
fn table() -> Vec<(Status, E, Want)> {
    let bad = || Want::No(Refused::InvalidConfig("bad".into()));
    vec![
        // Load requested.
        (Inactive, E::Load, ok(Inactive, &[SAVE, LOAD, A7])),
        (Fetching, E::Load, ok(Fetching, &[SAVE, LOAD, A7])),
        (Verifying, E::Load, ok(Verifying, &[SAVE, LOAD, A7])),
        (Loading, E::Load, ok(Loading, &[SAVE, LOAD, A7])),
        (Loaded, E::Load, ok(Loaded, &[SAVE, A3])),
        (Unloading, E::Load, ok(Unloading, &[SAVE, LOAD, A7])),
        (Failed, E::Load, ok(Failed, &[SAVE, LOAD, A7])),
        (Busy, E::Load, ok(Busy, &[SAVE, LOAD, A7])),
        (Unsupported, E::Load, ok(Unsupported, &[SAVE, LOAD, A7])),
        (Invalid, E::Load, bad()),
        // Unload requested.
        (Inactive, E::Unload, ok(Inactive, &[SAVE, A3])),
        (Fetching, E::Unload, ok(Fetching, &[SAVE, UNLOAD, A7])),
        (Verifying, E::Unload, ok(Verifying, &[SAVE, UNLOAD, A7])),
        (Loading, E::Unload, ok(Loading, &[SAVE, UNLOAD, A7])),
        (Loaded, E::Unload, ok(Loaded, &[SAVE, UNLOAD, A7])),
        (Unloading, E::Unload, ok(Unloading, &[SAVE, UNLOAD, A7])),
        (Failed, E::Unload, ok(Failed, &[SAVE, UNLOAD, A7])),
        (Busy, E::Unload, ok(Busy, &[SAVE, UNLOAD, A7])),
        (Unsupported, E::Unload, ok(Unsupported, &[SAVE, A3])),
        (Invalid, E::Unload, ok(Invalid, &[SAVE, A3])),
        // Reload requested.
        (Inactive, E::Reload, ok(Inactive, &[SAVE, RELOAD, A7])),
        (Fetching, E::Reload, ok(Fetching, &[SAVE, RELOAD, A7])),
        (Verifying, E::Reload, ok(Verifying, &[SAVE, RELOAD, A7])),
        (Loading, E::Reload, ok(Loading, &[SAVE, RELOAD, A7])),
        (Loaded, E::Reload, ok(Loaded, &[SAVE, RELOAD, A7])),
        (Unloading, E::Reload, ok(Unloading, &[SAVE, RELOAD, A7])),
        (Failed, E::Reload, ok(Failed, &[SAVE, RELOAD, A7])),
        (Busy, E::Reload, ok(Busy, &[SAVE, RELOAD, A7])),
        (Unsupported, E::Reload, ok(Unsupported, &[SAVE, RELOAD, A7])),
        (Invalid, E::Reload, bad()),
        // A changed, valid config of a wanted module.
        (Inactive, E::Changed, ok(Inactive, &[LOAD])),
        (Fetching, E::Changed, ok(Fetching, &[])),
        (Verifying, E::Changed, ok(Verifying, &[])),
        (Loading, E::Changed, ok(Loading, &[])),
        (Loaded, E::Changed, ok(Loaded, &[RELOAD])),
        (Unloading, E::Changed, ok(Unloading, &[])),
        (Failed, E::Changed, ok(Failed, &[RELOAD])),
        (Busy, E::Changed, ok(Busy, &[RELOAD])),
        (Unsupported, E::Changed, ok(Unsupported, &[LOAD])),
        (Invalid, E::Changed, ok(Inactive, &[LOAD])),
        // An invalid file: the last good config stays.
        (Inactive, E::Invalid, ok(Inactive, &[])),
        (Fetching, E::Invalid, ok(Fetching, &[])),
        (Verifying, E::Invalid, ok(Verifying, &[])),
        (Loading, E::Invalid, ok(Loading, &[])),
        (Loaded, E::Invalid, ok(Loaded, &[])),
        (Unloading, E::Invalid, ok(Unloading, &[])),
        (Failed, E::Invalid, ok(Failed, &[])),
        (Busy, E::Invalid, ok(Busy, &[])),
        (Unsupported, E::Invalid, ok(Unsupported, &[])),
        (Invalid, E::Invalid, ok(Invalid, &[])),
        // The file is gone: unload what may be loaded, forget the rest.
        (Inactive, E::Removed, ok(Inactive, &[SAVE, FORGET])),
        (Fetching, E::Removed, ok(Fetching, &[SAVE, UNLOAD])),
        (Verifying, E::Removed, ok(Verifying, &[SAVE, UNLOAD])),
        (Loading, E::Removed, ok(Loading, &[SAVE, UNLOAD])),
        (Loaded, E::Removed, ok(Loaded, &[SAVE, UNLOAD])),
        (Unloading, E::Removed, ok(Unloading, &[SAVE, UNLOAD])),
        (Failed, E::Removed, ok(Failed, &[SAVE, FORGET])),
        (Busy, E::Removed, ok(Busy, &[SAVE, UNLOAD])),
        (Unsupported, E::Removed, ok(Unsupported, &[SAVE, FORGET])),
        (Invalid, E::Removed, ok(Invalid, &[SAVE, FORGET])),
        // Start-up adoption of what is live as recorded.
        (Inactive, E::Restored, ok(Loaded, &[])),
        (Fetching, E::Restored, not_now(Fetching, E::Restored)),
        (Verifying, E::Restored, not_now(Verifying, E::Restored)),
        (Loading, E::Restored, not_now(Loading, E::Restored)),
        (Loaded, E::Restored, not_now(Loaded, E::Restored)),
        (Unloading, E::Restored, not_now(Unloading, E::Restored)),
        (Failed, E::Restored, not_now(Failed, E::Restored)),
        (Busy, E::Restored, not_now(Busy, E::Restored)),
        (Unsupported, E::Restored, not_now(Unsupported, E::Restored)),
        (Invalid, E::Restored, not_now(Invalid, E::Restored)),
        // Waiting for predecessors (a queued operation, nothing running).
        (Inactive, E::Waiting, ok(Inactive, &[])),
        (Fetching, E::Waiting, not_now(Fetching, E::Waiting)),
        (Verifying, E::Waiting, not_now(Verifying, E::Waiting)),
        (Loading, E::Waiting, not_now(Loading, E::Waiting)),
        (Loaded, E::Waiting, ok(Loaded, &[])),
        (Unloading, E::Waiting, not_now(Unloading, E::Waiting)),
        (Failed, E::Waiting, ok(Failed, &[])),
        (Busy, E::Waiting, ok(Busy, &[])),
        (Unsupported, E::Waiting, ok(Unsupported, &[])),
        (Invalid, E::Waiting, ok(Invalid, &[])),
        // Starting the queued load.
        (Inactive, E::Started, ok(Verifying, &[RUN])),
        (Fetching, E::Started, not_now(Fetching, E::Started)),
        (Verifying, E::Started, not_now(Verifying, E::Started)),
        (Loading, E::Started, not_now(Loading, E::Started)),
        (Loaded, E::Started, ok(Verifying, &[RUN])),
        (Unloading, E::Started, not_now(Unloading, E::Started)),
        (Failed, E::Started, ok(Verifying, &[RUN])),
        (Busy, E::Started, ok(Verifying, &[RUN])),
        (Unsupported, E::Started, ok(Verifying, &[RUN])),
        (Invalid, E::Started, ok(Verifying, &[RUN])),
        // Progress of running work.
        (Inactive, E::Progress, not_now(Inactive, E::Progress)),
        (Fetching, E::Progress, ok(Fetching, &[])),
        (Verifying, E::Progress, ok(Fetching, &[])),
        (Loading, E::Progress, ok(Fetching, &[])),
        (Loaded, E::Progress, not_now(Loaded, E::Progress)),
        (Unloading, E::Progress, ok(Fetching, &[])),
        (Failed, E::Progress, not_now(Failed, E::Progress)),
        (Busy, E::Progress, not_now(Busy, E::Progress)),
        (Unsupported, E::Progress, not_now(Unsupported, E::Progress)),
        (Invalid, E::Progress, not_now(Invalid, E::Progress)),
        // Work done: loaded.
        (Inactive, E::DoneOk, not_now(Inactive, E::DoneOk)),
        (Fetching, E::DoneOk, ok(Loaded, &[])),
        (Verifying, E::DoneOk, ok(Loaded, &[])),
        (Loading, E::DoneOk, ok(Loaded, &[])),
        (Loaded, E::DoneOk, not_now(Loaded, E::DoneOk)),
        (Unloading, E::DoneOk, ok(Loaded, &[])),
        (Failed, E::DoneOk, not_now(Failed, E::DoneOk)),
        (Busy, E::DoneOk, not_now(Busy, E::DoneOk)),
        (Unsupported, E::DoneOk, not_now(Unsupported, E::DoneOk)),
        (Invalid, E::DoneOk, not_now(Invalid, E::DoneOk)),
        // Work done: failed, retried.
        (Inactive, E::DoneFailed, not_now(Inactive, E::DoneFailed)),
        (Fetching, E::DoneFailed, ok(Failed, &[ARM])),
        (Verifying, E::DoneFailed, ok(Failed, &[ARM])),
        (Loading, E::DoneFailed, ok(Failed, &[ARM])),
        (Loaded, E::DoneFailed, not_now(Loaded, E::DoneFailed)),
        (Unloading, E::DoneFailed, ok(Failed, &[ARM])),
        (Failed, E::DoneFailed, not_now(Failed, E::DoneFailed)),
        (Busy, E::DoneFailed, not_now(Busy, E::DoneFailed)),
        (
            Unsupported,
            E::DoneFailed,
            not_now(Unsupported, E::DoneFailed),
        ),
        (Invalid, E::DoneFailed, not_now(Invalid, E::DoneFailed)),
        // The retry timer fired.
        (Inactive, E::Retry, not_now(Inactive, E::Retry)),
        (Fetching, E::Retry, not_now(Fetching, E::Retry)),
        (Verifying, E::Retry, not_now(Verifying, E::Retry)),
        (Loading, E::Retry, not_now(Loading, E::Retry)),
        (Loaded, E::Retry, not_now(Loaded, E::Retry)),
        (Unloading, E::Retry, not_now(Unloading, E::Retry)),
        (Failed, E::Retry, ok(Failed, &[LOAD])),
        (Busy, E::Retry, ok(Busy, &[RELOAD])),
        (Unsupported, E::Retry, not_now(Unsupported, E::Retry)),
        (Invalid, E::Retry, not_now(Invalid, E::Retry)),
        // Shutdown with unload_on_stop.
        (Inactive, E::Shutdown, ok(Inactive, &[])),
        (Fetching, E::Shutdown, ok(Fetching, &[])),
        (Verifying, E::Shutdown, ok(Verifying, &[])),
        (Loading, E::Shutdown, ok(Loading, &[])),
        (Loaded, E::Shutdown, ok(Loaded, &[UNLOAD])),
        (Unloading, E::Shutdown, ok(Unloading, &[])),
        (Failed, E::Shutdown, ok(Failed, &[])),
        (Busy, E::Shutdown, ok(Busy, &[])),
        (Unsupported, E::Shutdown, ok(Unsupported, &[])),
        (Invalid, E::Shutdown, ok(Invalid, &[])),
    ]
}

#[test]
fn every_status_and_event_gives_what_the_table_says() {
    let table = table();
    // The table covers every combination exactly once.
    assert_eq!(table.len(), Status::ALL.len() * EVENTS.len());
    for st in Status::ALL {
        for e in EVENTS {
            let rows = table.iter().filter(|(s, x, _)| *s == st && *x == e).count();
            assert_eq!(rows, 1, "{st} × {e:?}: {rows} rows");
        }
    }
    for (st, e, want) in table {
        let (m, ev) = case(st, e);
        let got = match transition(&m, ev, &CTX) {
            Ok((n, fx)) => Want::Ok(n.status, fx),
            Err(r) => Want::No(r),
        };
        assert_eq!(got, want, "{st} × {e:?}");
    }
}

fn apply(m: &Module, ev: Event) -> (Module, Vec<Effect>) {
    transition(m, ev, &CTX).unwrap()
}

#[test]
fn a_request_for_a_removed_config_is_not_found_and_removal_is_not_repeated() {
    let (m, _) = apply(&model(Loaded), Event::ConfigRemoved { seq: 7 });
    assert!(m.removed && !m.wanted);
    for ev in [
        Event::LoadRequested { seq: 8 },
        Event::UnloadRequested { seq: 8 },
        Event::ReloadRequested { seq: 8 },
        Event::ConfigRemoved { seq: 8 },
    ] {
        assert_eq!(transition(&m, ev, &CTX).unwrap_err(), Refused::NotFound);
    }
    // The unload runs, then the config is forgotten.
    let (m, fx) = apply(
        &m,
        Event::WorkStarted {
            op: Operation::Unload,
            seq: 7,
        },
    );
    assert_eq!(
        (m.status, fx),
        (Unloading, vec![Effect::Run(Operation::Unload, 7)])
    );
    let (m, fx) = apply(
        &m,
        Event::WorkDone {
            op: Operation::Unload,
            seq: 7,
            ran: Ran::Unload,
            outcome: outcome(State::Inactive, None, &[("m", Action::Removed)]),
        },
    );
    assert_eq!((m.status, fx), (Inactive, vec![Effect::Forget]));
    assert!(m.owned.is_empty() && !m.recorded);
}

#[test]
fn a_file_back_after_removal_is_known_again_but_not_wanted() {
    let (m, _) = apply(&model(Loaded), Event::ConfigRemoved { seq: 7 });
    let (m, fx) = apply(
        &m,
        Event::ConfigChanged {
            file: "g.toml".into(),
            digest: "d1".into(),
            modules: s(&["m"]),
            seq: 8,
        },
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert!(!m.removed && !m.wanted);
    assert_eq!(m.config_file, "g.toml");
    // The unload queued at removal still runs.
    assert_eq!(m.queue, [(Operation::Unload, 7)]);
}

#[test]
fn an_unchanged_or_unwanted_config_is_not_followed() {
    let same = Event::ConfigChanged {
        file: "f.toml".into(),
        digest: "d1".into(),
        modules: s(&["m"]),
        seq: 7,
    };
    assert!(apply(&model(Loaded), same).1.is_empty());
    let mut unwanted = model(Loaded);
    unwanted.wanted = false;
    let changed = Event::ConfigChanged {
        file: "f.toml".into(),
        digest: "d2".into(),
        modules: s(&["m"]),
        seq: 7,
    };
    assert!(apply(&unwanted, changed.clone()).1.is_empty());
    // Inactive with work queued already: nothing more.
    let mut queued = model(Inactive);
    queued.queue.push_back((Operation::Load, 6));
    assert!(apply(&queued, changed.clone()).1.is_empty());
    // Stopping: nothing is started.
    let (stopping, _) = apply(&model(Loaded), Event::Shutdown { unload_seq: None });
    assert!(apply(&stopping, changed).1.is_empty());
}

#[test]
fn an_invalid_file_keeps_the_last_good_config_and_says_so() {
    let (m, _) = apply(
        &model(Loaded),
        Event::ConfigInvalid {
            file: "f.toml".into(),
            error: "oops".into(),
        },
    );
    assert_eq!(m.status, Loaded);
    assert_eq!(
        m.error,
        "invalid configuration, keeping the last good one: oops"
    );
    // Work finishing keeps saying so; a good file clears it.
    let mut m = m;
    m.status = Loading;
    let (m, _) = apply(
        &m,
        Event::WorkDone {
            op: Operation::Load,
            seq: 4,
            ran: Ran::Load,
            outcome: outcome(State::Loaded, None, &[]),
        },
    );
    assert_eq!(
        m.error,
        "invalid configuration, keeping the last good one: oops"
    );
    let (m, _) = apply(
        &m,
        Event::ConfigChanged {
            file: "f.toml".into(),
            digest: "d1".into(),
            modules: s(&["m"]),
            seq: 7,
        },
    );
    assert_eq!((m.error.as_str(), m.config_error.as_ref()), ("", None));
    // Without a good one, it is invalid and cannot be loaded.
    let (m, _) = apply(
        &model(Invalid),
        Event::ConfigInvalid {
            file: "f.toml".into(),
            error: "worse".into(),
        },
    );
    assert_eq!((m.status, m.error.as_str()), (Invalid, "worse"));
    assert_eq!(
        transition(&m, Event::LoadRequested { seq: 7 }, &CTX).unwrap_err(),
        Refused::InvalidConfig("worse".into())
    );
    // A removed config back as an invalid file while its unload runs: not loadable, settled by the unload.
    let (m, _) = apply(&model(Unloading), Event::ConfigRemoved { seq: 7 });
    let (m, _) = apply(
        &m,
        Event::ConfigInvalid {
            file: "f.toml".into(),
            error: "half".into(),
        },
    );
    assert_eq!(
        (m.status, m.removed, m.error.as_str()),
        (Unloading, false, "half")
    );
    assert_eq!(
        transition(&m, Event::ReloadRequested { seq: 8 }, &CTX).unwrap_err(),
        Refused::InvalidConfig("half".into())
    );
}

#[test]
fn failures_back_off_and_success_resets_the_count() {
    let mut m = model(Verifying);
    let failed = || Event::WorkDone {
        op: Operation::Load,
        seq: 4,
        ran: Ran::Load,
        outcome: outcome(State::Failed, Some(Step::Insert), &[]),
    };
    let (n, fx) = apply(&m, failed());
    assert_eq!(fx, [Effect::ArmRetry(Duration::from_secs(5))]);
    assert_eq!(
        (n.attempts, n.retry, n.next_retry),
        (1, Some(Operation::Load), 105)
    );
    assert_eq!(
        (n.step.as_str(), n.error.as_str()),
        ("insert", "insert broke")
    );
    assert_eq!(n.completed_op, 4);
    // The retry queues a load, which clears the pending retry.
    let (n, fx) = apply(&n, Event::RetryDue { seq: 8 });
    assert_eq!(fx, [Effect::Queued(Operation::Load, 8)]);
    assert_eq!((n.retry, n.next_retry), (None, 0));
    // An unwanted module whose load failed is not retried.
    m.wanted = false;
    assert!(apply(&m, failed()).1.is_empty());
    // A failed unload of an unwanted module is retried as an unload.
    let mut u = model(Unloading);
    u.wanted = false;
    u.owned = s(&["m"]);
    let (u, fx) = apply(
        &u,
        Event::WorkDone {
            op: Operation::Unload,
            seq: 4,
            ran: Ran::Unload,
            outcome: outcome(State::Busy, Some(Step::Remove), &[]),
        },
    );
    assert_eq!((u.status, fx.len()), (Busy, 1));
    assert_eq!(u.owned, ["m"]);
    assert_eq!(
        apply(&u, Event::RetryDue { seq: 9 }).1,
        [Effect::Queued(Operation::Unload, 9)]
    );
    // Success resets the attempts.
    let mut ok = model(Loading);
    ok.attempts = 4;
    let (ok, _) = apply(
        &ok,
        Event::WorkDone {
            op: Operation::Load,
            seq: 4,
            ran: Ran::Load,
            outcome: outcome(State::Loaded, None, &[]),
        },
    );
    assert_eq!((ok.attempts, ok.step.as_str()), (0, ""));
}

#[test]
fn no_retry_while_stopping_or_with_work_queued() {
    let done = Event::WorkDone {
        op: Operation::Load,
        seq: 4,
        ran: Ran::Load,
        outcome: outcome(State::Failed, Some(Step::Fetch), &[]),
    };
    let (stopping, _) = apply(&model(Fetching), Event::Shutdown { unload_seq: None });
    assert!(apply(&stopping, done.clone()).1.is_empty());
    let mut queued = model(Fetching);
    queued.queue.push_back((Operation::Unload, 9));
    assert!(apply(&queued, done).1.is_empty());
}

#[test]
fn shutdown_drops_queued_work_and_retries_once() {
    let mut m = model(Failed);
    m.queue.push_back((Operation::Load, 6));
    let (n, fx) = apply(
        &m,
        Event::Shutdown {
            unload_seq: Some(7),
        },
    );
    assert!(fx.is_empty());
    assert!(n.queue.is_empty() && n.retry.is_none() && n.stopping);
    assert!(matches!(
        transition(&n, Event::Shutdown { unload_seq: None }, &CTX),
        Err(Refused::NotNow { .. })
    ));
}

#[test]
fn requests_replace_queued_work_of_the_other_kind() {
    let mut m = model(Loading);
    m.queue.push_back((Operation::Unload, 5));
    let (m, _) = apply(&m, Event::LoadRequested { seq: 6 });
    assert_eq!(m.queue, [(Operation::Load, 6)]);
    let (m, _) = apply(&m, Event::UnloadRequested { seq: 7 });
    assert_eq!(m.queue, [(Operation::Unload, 7)]);
    // A loaded module with an unload queued is loaded already: no new load.
    let mut l = model(Loaded);
    l.queue.push_back((Operation::Unload, 5));
    let (l, fx) = apply(&l, Event::LoadRequested { seq: 6 });
    assert_eq!(fx, [Effect::SaveDesired, Effect::Answer(3)]);
    assert!(l.queue.is_empty() && l.wanted);
}

#[test]
fn work_starts_only_as_the_front_of_the_queue() {
    let mut m = model(Inactive);
    m.queue.push_back((Operation::Load, 6));
    m.queue.push_back((Operation::Reload, 7));
    assert!(matches!(
        transition(
            &m,
            Event::WorkStarted {
                op: Operation::Reload,
                seq: 7
            },
            &CTX
        ),
        Err(Refused::NotNow { .. })
    ));
    m.error = "old".into();
    m.next_retry = 9;
    let (n, _) = apply(
        &m,
        Event::WorkStarted {
            op: Operation::Load,
            seq: 6,
        },
    );
    assert_eq!(n.queue, [(Operation::Reload, 7)]);
    assert_eq!((n.started_op, n.error.as_str(), n.next_retry), (6, "", 0));
    assert_eq!(n.since, 100, "since moves with the status");
    let mut u = model(Loaded);
    u.queue.push_back((Operation::Unload, 6));
    let (u, _) = apply(
        &u,
        Event::WorkStarted {
            op: Operation::Unload,
            seq: 6,
        },
    );
    assert_eq!(u.status, Unloading);
}

#[test]
fn steps_map_to_statuses() {
    for (from, step, want) in [
        (Verifying, Step::Fetch, Fetching),
        (Fetching, Step::Stage, Verifying),
        (Fetching, Step::Verify, Verifying),
        (Verifying, Step::Insert, Loading),
        (Loading, Step::Remove, Unloading),
        (Unloading, Step::Hook, Unloading),
        (Loading, Step::Hook, Loading),
        (Unloading, Step::Restore, Unloading),
    ] {
        let (n, _) = apply(&model(from), Event::StepProgress(step));
        assert_eq!(
            (n.status, n.step.as_str()),
            (want, step.as_str()),
            "{from} {step:?}"
        );
    }
    // The same status keeps its `since`.
    let (n, _) = apply(&model(Fetching), Event::StepProgress(Step::Fetch));
    assert_eq!(n.since, 10);
}

#[test]
fn adoption_takes_the_record_time_and_modules() {
    let (n, _) = apply(
        &model(Inactive),
        Event::Restored {
            recorded: true,
            live: Some((5, s(&["m", "dep"]))),
        },
    );
    assert_eq!((n.status, n.since), (Loaded, 5));
    assert_eq!(n.published("x", "k").loaded_modules, ["m", "dep"]);
    // Not live: stays inactive, but the record is remembered for removal.
    let (n, _) = apply(
        &model(Inactive),
        Event::Restored {
            recorded: true,
            live: None,
        },
    );
    assert_eq!(n.status, Inactive);
    let (_, fx) = apply(&n, Event::ConfigRemoved { seq: 7 });
    assert_eq!(
        fx,
        [Effect::SaveDesired, Effect::Queued(Operation::Unload, 7)]
    );
}

#[test]
fn owned_modules_follow_outcomes() {
    let before = s(&["a"]);
    let inserted = [("b", Action::Inserted), ("a", Action::AlreadyLoaded)];
    // A load adds what it inserted to what was held.
    let o = outcome(State::Loaded, None, &inserted);
    assert_eq!(owned_after(&before, Ran::Load, &o), ["a", "b"]);
    // After a reload's unload, only what the load inserted.
    assert_eq!(owned_after(&before, Ran::UnloadThenLoad, &o), ["b"]);
    // A failed insert rolled back; a failed ready check left them in.
    let o = outcome(State::Failed, Some(Step::Insert), &inserted);
    assert_eq!(owned_after(&before, Ran::Load, &o), ["a"]);
    let o = outcome(State::Failed, Some(Step::Ready), &inserted);
    assert_eq!(owned_after(&before, Ran::Load, &o), ["a", "b"]);
    // An unload that stopped half-way holds what it did not remove.
    let both = s(&["a", "b"]);
    let o = outcome(State::Failed, Some(Step::Remove), &[("b", Action::Removed)]);
    assert_eq!(owned_after(&both, Ran::Unload, &o), ["a"]);
    let o = outcome(State::Inactive, None, &[]);
    assert!(owned_after(&both, Ran::Unload, &o).is_empty());
}

#[test]
fn the_published_status_is_derived_from_the_model() {
    let mut m = model(Loaded);
    m.owned.clear();
    m.image = "reg/x:1".into();
    let p = m.published("simple-kmod", "6.1.0");
    assert_eq!(p.name, "simple-kmod");
    assert_eq!(p.kernel, "6.1.0");
    assert_eq!(p.state, Loaded);
    assert_eq!(p.image, "reg/x:1");
    assert!(p.wanted);
    // Loaded with nothing inserted by kvcd (a KVC library): the configured names.
    assert_eq!(p.loaded_modules, ["m"]);
    let p = model(Failed).published("x", "k");
    assert!(p.loaded_modules.is_empty());
    assert_eq!((p.next_retry, p.completed_op), (50, 3));
}

#[test]
fn statuses_round_trip_through_their_names() {
    for st in Status::ALL {
        assert_eq!(Status::parse(st.as_str()), Some(st));
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            serde_json::json!(st.as_str())
        );
    }
    assert_eq!(Status::parse("loadedx"), None);
    let settled: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_settled()).collect();
    assert_eq!(
        settled,
        [Inactive, Loaded, Failed, Busy, Unsupported, Invalid]
    );
}
