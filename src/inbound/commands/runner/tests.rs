//! The runner's guarantees, without a broker: a fake driver (the receiving end of a device's
//! route) and a fake journal. Time is tokio's paused clock, so timeouts cost nothing and "no
//! completion" means every task is idle, not that we stopped waiting.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::agent::service::{shutdown_channel, ShutdownTrigger};
use crate::inbound::auth::claims::{CommandClaim, KeyKind};

const ISSUED_AT: u64 = 1_795_786_200;
const RESTARTED_AT: u64 = 1_795_786_272;

#[derive(Default)]
struct FakeJournal {
    /// Command id → (issued-at, target device), as auth records a command before it runs.
    seen: BTreeMap<String, (u64, Option<String>)>,
    replies: BTreeMap<String, Vec<u8>>,
}

/// The agent's clock after the restart.
fn restarted_at() -> u64 {
    RESTARTED_AT
}

impl Journal for FakeJournal {
    fn unanswered(&self, ids: &[String]) -> Vec<(String, u64, Option<String>)> {
        ids.iter()
            .filter(|id| !self.replies.contains_key(*id))
            .filter_map(|id| {
                let (issued_at, target) = self.seen.get(id)?;
                Some((id.clone(), *issued_at, target.clone()))
            })
            .collect()
    }
    fn record_reply(&mut self, command_id: &str, reply: &[u8]) {
        self.replies.insert(command_id.to_owned(), reply.to_vec());
    }
}

fn claims(command_id: &str, device_id: &str) -> Box<AttestationClaims> {
    Box::new(AttestationClaims {
        iss: "platform".into(),
        kid: "platform-1".into(),
        aud: "gw-1".into(),
        jti: command_id.into(),
        iat: ISSUED_AT,
        exp: ISSUED_AT + 3_600,
        api_key_id: "key-1".into(),
        api_key_kind: KeyKind::Server,
        workspace_id: "ws-1".into(),
        reference_id: None,
        command: CommandClaim {
            slug: "battery:set-reserve".into(),
            input: serde_json::Map::new(),
            device_id: Some(device_id.into()),
        },
    })
}

/// A device whose driver is the test: commands sent to it arrive on the returned receiver.
fn device(device_id: &str, timeout_secs: u64) -> (DeviceRun, mpsc::Receiver<DriverCommand>) {
    let (route, driver) = mpsc::channel(8);
    let run = DeviceRun {
        device_id: device_id.into(),
        device_type: crate::model::device::DeviceType::Battery,
        slug: crate::inbound::commands::catalog::Slug::BatterySetReserve,
        route,
        timeout: Duration::from_secs(timeout_secs),
        input: serde_json::Map::new(),
        hold_secs: None,
    };
    (run, driver)
}

fn runner() -> (Runner, ShutdownTrigger) {
    let (trigger, stop) = shutdown_channel();
    (
        Runner::new(stop, Clock::system().with_source(restarted_at)),
        trigger,
    )
}

fn parse(reply: &[u8]) -> Value {
    serde_json::from_slice(reply).expect("a reply is JSON")
}

/// The reply a device command ends with when its driver answers `answer`.
async fn reply_when_the_driver_answers(answer: Result<Value, CommandFailure>) -> Value {
    let (mut runner, _trigger) = runner();
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    let command = driver.recv().await.expect("the driver gets the command");
    command.done.send(answer).unwrap();
    let done = runner.completed().await;
    parse(&runner.finish(done, None))
}

#[tokio::test(start_paused = true)]
async fn a_newer_command_supersedes_the_running_one_with_409() {
    let (mut runner, _trigger) = runner();
    let (first, mut driver) = device("bat-1", 30);
    let second = DeviceRun {
        route: first.route.clone(),
        ..device("bat-1", 30).0
    };
    runner.start(claims("c1", "bat-1"), first);
    let c1 = driver.recv().await.unwrap();
    runner.start(claims("c2", "bat-1"), second);
    let c2 = driver.recv().await.unwrap();
    assert_eq!(runner.runs.running("bat-1"), Some("c2"));

    let done = runner.completed().await;
    let reply = parse(&runner.finish(done, None));
    assert_eq!(reply["commandId"], "c1");
    assert_eq!(reply["type"], "command.failed");
    assert_eq!(reply["status"], 409);
    assert_eq!(reply["error"]["code"], "SUPERSEDED");
    assert_eq!(reply["error"]["message"], "superseded by command c2");
    assert!(c1.done.is_closed(), "the driver is told to cancel c1");
    assert!(!c2.done.is_closed());
    assert_eq!(
        runner.runs.running("bat-1"),
        Some("c2"),
        "the superseded command's end leaves its successor running"
    );

    c2.done.send(Ok(json!({"backupReserve": 50}))).unwrap();
    let done = runner.completed().await;
    let reply = parse(&runner.finish(done, None));
    assert_eq!(reply["commandId"], "c2");
    assert_eq!(reply["status"], 200);
    assert_eq!(runner.runs.running("bat-1"), None);
}

#[tokio::test(start_paused = true)]
async fn commands_for_different_devices_do_not_supersede_each_other() {
    let (mut runner, _trigger) = runner();
    let (battery, mut battery_driver) = device("bat-1", 30);
    let (charger, mut charger_driver) = device("ev-1", 30);
    runner.start(claims("c1", "bat-1"), battery);
    runner.start(claims("c2", "ev-1"), charger);
    let c1 = battery_driver.recv().await.unwrap();
    let c2 = charger_driver.recv().await.unwrap();
    assert!(!c1.done.is_closed() && !c2.done.is_closed());
    assert_eq!(runner.runs.running("bat-1"), Some("c1"));
    assert_eq!(runner.runs.running("ev-1"), Some("c2"));
}

#[tokio::test(start_paused = true)]
async fn a_command_that_outlives_its_timeout_fails_504_and_the_driver_is_told_to_cancel() {
    let (mut runner, _trigger) = runner();
    let (run, mut driver) = device("bat-1", 30);
    let started = tokio::time::Instant::now();
    runner.start(claims("c1", "bat-1"), run);
    let command = driver.recv().await.unwrap();

    let done = runner.completed().await;
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    let reply = parse(&runner.finish(done, None));
    assert_eq!(reply["status"], 504);
    assert_eq!(reply["error"]["code"], "COMMAND_TIMEOUT");
    assert_eq!(
        reply["error"]["message"],
        "timed out after 30 s; the driver was told to cancel"
    );
    assert!(
        command.done.is_closed(),
        "the driver sees its answer unwanted"
    );
    assert_eq!(runner.runs.running("bat-1"), None);
}

#[tokio::test(start_paused = true)]
async fn completion_records_the_reply_before_publishing() {
    let (mut runner, _trigger) = runner();
    let mut journal = FakeJournal::default();
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    let command = driver.recv().await.unwrap();
    command.done.send(Ok(json!({"backupReserve": 50}))).unwrap();

    let done = runner.completed().await;
    // `finish` hands the reply out for publishing only once it is in the journal.
    let to_publish = runner.finish(done, Some(&mut journal));
    assert_eq!(journal.replies.get("c1"), Some(&to_publish));
    let reply = parse(&to_publish);
    assert_eq!(reply["type"], "command.succeeded");
    assert_eq!(reply["deviceId"], "bat-1");
    assert_eq!(reply["issuedAt"], "2026-11-27T13:30:00Z");
    assert_eq!(reply["result"], json!({"backupReserve": 50}));
}

#[tokio::test(start_paused = true)]
async fn a_command_cut_short_by_a_stop_is_neither_answered_nor_recorded() {
    let (mut runner, trigger) = runner();
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    let command = driver.recv().await.unwrap();
    trigger.trigger();
    // What a process driver answers as the stop tears it down: never the command's reply.
    let _ = command.done.send(Err(CommandFailure::ShuttingDown));

    // Paused time advances only once every task is idle: the command's task has ended.
    let completion = tokio::time::timeout(Duration::from_secs(3_600), runner.completed()).await;
    assert!(completion.is_err(), "no reply: {completion:?}");
}

#[tokio::test(start_paused = true)]
async fn a_command_started_once_the_stop_began_never_reaches_its_driver_and_is_not_answered() {
    let (mut runner, trigger) = runner();
    trigger.trigger();
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    let completion = tokio::time::timeout(Duration::from_secs(3_600), runner.completed()).await;
    assert!(completion.is_err(), "no reply: {completion:?}");
    assert!(driver.try_recv().is_err(), "the driver got the command");
}

#[test]
fn interrupted_commands_are_reported_once_after_a_restart() {
    let mut journal = FakeJournal::default();
    journal
        .seen
        .insert("c1".into(), (ISSUED_AT, Some("bat-1".into())));
    journal.seen.insert("c2".into(), (ISSUED_AT, None));
    journal.seen.insert("c3".into(), (ISSUED_AT, None));
    journal.replies.insert("c3".into(), b"answered".to_vec());
    let ids: Vec<String> = ["c1", "c2", "c3"].map(String::from).to_vec();

    let (trigger, stop) = shutdown_channel();
    let mut runner = Runner::new(stop.clone(), Clock::system().with_source(restarted_at));
    runner.report_interrupted(&mut journal, "gw-1", &ids);
    let published = runner.take_interrupted();
    let replies: Vec<Value> = published.iter().map(|r| parse(r)).collect();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0]["commandId"], "c1");
    assert_eq!(replies[0]["deviceId"], "bat-1");
    assert_eq!(replies[1]["deviceId"], "gw-1", "no deviceId: the gateway's");
    for reply in &replies {
        assert_eq!(reply["type"], "command.failed");
        assert_eq!(reply["status"], 500);
        assert_eq!(reply["error"]["code"], "COMMAND_FAILED");
        assert_eq!(
            reply["error"]["message"],
            "interrupted: the agent stopped while the command was running"
        );
        assert_eq!(reply["issuedAt"], "2026-11-27T13:30:00Z");
        assert_eq!(reply["executedAt"], "2026-11-27T13:31:12Z");
    }
    assert!(runner.take_interrupted().is_empty(), "published once");
    assert_eq!(journal.replies["c1"], published[0], "recorded as published");
    assert_eq!(
        journal.replies["c3"], b"answered",
        "an answered command is left alone"
    );

    // Recorded, so the start after that has nothing to report.
    drop(trigger);
    let mut next = Runner::new(stop, Clock::system().with_source(restarted_at));
    next.report_interrupted(&mut journal, "gw-1", &ids);
    assert!(next.take_interrupted().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_busy_driver_fails_409_device_busy() {
    let reply = reply_when_the_driver_answers(Err(CommandFailure::DriverBusy)).await;
    assert_eq!(reply["status"], 409);
    assert_eq!(reply["error"]["code"], "DEVICE_BUSY");
    assert_eq!(reply["error"]["message"], "driver busy");
}

#[tokio::test(start_paused = true)]
async fn a_driver_that_is_not_running_fails_503_device_unavailable() {
    let reply = reply_when_the_driver_answers(Err(CommandFailure::DriverNotRunning)).await;
    assert_eq!(reply["status"], 503);
    assert_eq!(reply["error"]["code"], "DEVICE_UNAVAILABLE");
    assert_eq!(reply["error"]["message"], "driver not running");
    assert!(reply.get("retryAfter").is_none(), "the failure is recorded");
}

#[tokio::test(start_paused = true)]
async fn a_failure_the_driver_reports_fails_500_with_its_reason() {
    let reason = CommandFailure::Reported("unsupported operatingMode \"turbo\"".into());
    let reply = reply_when_the_driver_answers(Err(reason)).await;
    assert_eq!(reply["status"], 500);
    assert_eq!(reply["error"]["code"], "COMMAND_FAILED");
    assert_eq!(
        reply["error"]["message"],
        "unsupported operatingMode \"turbo\""
    );
}

#[tokio::test(start_paused = true)]
async fn a_driver_that_exits_before_answering_fails_500() {
    let reply = reply_when_the_driver_answers(Err(CommandFailure::DriverExited)).await;
    assert_eq!(reply["status"], 500);
    assert_eq!(reply["error"]["message"], "driver exited");

    let (mut runner, _trigger) = runner();
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    drop(driver.recv().await.unwrap());
    let done = runner.completed().await;
    let reply = parse(&runner.finish(done, None));
    assert_eq!(reply["status"], 500);
    assert_eq!(reply["error"]["message"], "driver exited before answering");
}

#[test]
fn a_superseded_command_ending_late_leaves_its_successor_in_the_run_set() {
    let mut runs = RunSet::default();
    assert_eq!(runs.start("bat-1", "c1", 1), None);
    assert_eq!(runs.start("bat-1", "c2", 2), Some(("c1".to_string(), 1)));
    assert!(!runs.finish("bat-1", "c1"));
    assert_eq!(runs.running("bat-1"), Some("c2"));
    assert!(runs.finish("bat-1", "c2"));
    assert_eq!(runs.running("bat-1"), None);
}

fn in_1970() -> u64 {
    86_400
}

#[tokio::test(start_paused = true)]
async fn a_device_command_is_stamped_by_the_agents_clock_never_below_the_time_floor() {
    // A gateway whose clock reads 1970 but which has seen platform-signed times up to
    // RESTARTED_AT: executedAt is the floor, as for agent commands, not the raw clock.
    let clock = Clock::system().with_source(in_1970);
    clock.raise_floor(RESTARTED_AT);
    let (trigger, stop) = shutdown_channel();
    let mut runner = Runner::new(stop, clock);
    let (run, mut driver) = device("bat-1", 30);
    runner.start(claims("c1", "bat-1"), run);
    driver
        .recv()
        .await
        .unwrap()
        .done
        .send(Ok(json!({})))
        .unwrap();
    let done = runner.completed().await;
    let reply = parse(&runner.finish(done, None));
    assert_eq!(reply["executedAt"], "2026-11-27T13:31:12Z");
    drop(trigger);
}
