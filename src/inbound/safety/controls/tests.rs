//! The holds and fail-safe state machine, transition by transition, without a broker, a driver
//! or a clock: time is an argument.

use serde_json::json;

use super::*;
use crate::model::device::DeviceType;

const WINDOW: u64 = 60;
const T0: u64 = 1_795_786_200;

fn control(command: &str, input: serde_json::Value) -> Control {
    Control {
        command: command.into(),
        input: input.as_object().unwrap().clone(),
    }
}

fn battery() -> DeviceLimits {
    DeviceLimits {
        min_backup_reserve: Some(20.0),
        default_control: Some(control(
            "battery:set-reserve",
            json!({"chargePercentage": 30}),
        )),
        ..DeviceLimits::new("bat-1", DeviceType::Battery)
    }
}

fn thermostat_with_failsafe() -> DeviceLimits {
    DeviceLimits {
        failsafe_control: Some(control(
            "thermostat:set-operating-mode",
            json!({"operatingMode": "heat", "heatTarget": 68, "unit": "F"}),
        )),
        ..DeviceLimits::new("th-1", DeviceType::Thermostat)
    }
}

fn controls(entries: &[DeviceLimits], persisted: Persisted, now: u64) -> Controls {
    let settings = SafetySettings {
        failsafe_after_secs: WINDOW,
    };
    let mut c = Controls::new(entries, &settings, persisted, now);
    c.on_link(true, now);
    c
}

/// Runs `due` at `now` and reports every action done with `outcome`.
fn settle(c: &mut Controls, now: u64) -> (Vec<Action>, Vec<SafetyEvent>) {
    let (actions, mut events) = c.due(now);
    let mut events: Vec<SafetyEvent> = events.drain(..).map(|(_, e)| e).collect();
    for a in &actions {
        events.extend(c.on_action_done(&a.device_id, &a.id, Ok(()), now));
    }
    (actions, events)
}

#[test]
fn a_hold_lapses_at_its_deadline_and_the_default_control_is_applied() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.check_hold("bat-1").unwrap();
    c.on_dispatch("bat-1", "cmd_1", Some(300), T0);
    assert_eq!(c.hold_until("bat-1"), Some(T0 + 300));
    assert!(
        c.take_dirty(),
        "a new deadline is written before the command runs"
    );

    assert_eq!(settle(&mut c, T0 + 299).0, vec![], "one second early");
    let (actions, events) = settle(&mut c, T0 + 300);
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].reason, ControlReason::HoldExpired);
    assert_eq!(
        actions[0].control,
        control("battery:set-reserve", json!({"chargePercentage": 30}))
    );
    assert_eq!(
        events,
        vec![
            SafetyEvent::HoldExpired {
                deadline: T0 + 300,
                command: "battery:set-reserve".into()
            },
            SafetyEvent::ControlApplied {
                reason: ControlReason::HoldExpired,
                command: "battery:set-reserve".into()
            }
        ]
    );
    assert_eq!(c.hold_until("bat-1"), None);
    assert!(c.take_dirty());
    assert_eq!(c.persisted(), Persisted::default());
    assert_eq!(settle(&mut c, T0 + 400).0, vec![], "applied once");
}

#[test]
fn the_latest_command_wins_its_hold_replaces_the_last_and_none_ends_it() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.on_dispatch("bat-1", "cmd_1", Some(300), T0);
    c.on_dispatch("bat-1", "cmd_2", Some(60), T0 + 10);
    assert_eq!(c.hold_until("bat-1"), Some(T0 + 70));
    c.on_dispatch("bat-1", "cmd_3", None, T0 + 20);
    assert_eq!(c.hold_until("bat-1"), None);
    assert_eq!(settle(&mut c, T0 + 1_000).0, vec![]);
}

#[test]
fn a_hold_needs_a_default_control_to_return_to() {
    let c = controls(&[thermostat_with_failsafe()], Persisted::default(), T0);
    assert_eq!(
        c.check_hold("th-1").unwrap_err().to_string(),
        "holdSecs: th-1 has no default_control in its [[limits]] entry to return to when the \
         hold lapses"
    );
    assert!(c.check_hold("unknown-1").is_err());
}

#[test]
fn a_hold_survives_a_restart_and_one_past_its_deadline_lapses_at_the_first_tick() {
    let mut before = controls(&[battery()], Persisted::default(), T0);
    before.on_dispatch("bat-1", "cmd_1", Some(300), T0);
    let saved = before.persisted();
    let json = serde_json::to_string(&saved).unwrap();
    assert_eq!(
        json,
        format!(r#"{{"devices":{{"bat-1":{{"holdUntil":{}}}}}}}"#, T0 + 300)
    );

    // Restarted mid-hold: the deadline stands.
    let mut during = controls(&[battery()], serde_json::from_str(&json).unwrap(), T0 + 100);
    assert_eq!(during.hold_until("bat-1"), Some(T0 + 300));
    assert_eq!(settle(&mut during, T0 + 100).0, vec![]);
    assert_eq!(settle(&mut during, T0 + 300).0.len(), 1);

    // Booted after the deadline (a power cut through it): the default applies at once.
    let mut late = controls(&[battery()], saved, T0 + 5_000);
    let (actions, _) = settle(&mut late, T0 + 5_000);
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].reason, ControlReason::HoldExpired);
}

#[test]
fn the_link_down_for_the_window_enters_failsafe_once_and_ends_every_hold() {
    let mut c = controls(
        &[battery(), thermostat_with_failsafe()],
        Persisted::default(),
        T0,
    );
    c.on_dispatch("bat-1", "cmd_1", Some(3_600), T0);
    c.on_link(false, T0 + 10);
    assert_eq!(settle(&mut c, T0 + 10 + WINDOW - 1).0, vec![]);
    let (actions, events) = settle(&mut c, T0 + 10 + WINDOW);
    let reasons: Vec<_> = actions
        .iter()
        .map(|a| (&a.device_id[..], a.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("bat-1", ControlReason::Failsafe),
            ("th-1", ControlReason::Failsafe)
        ]
    );
    // The battery has no failsafe_control: its default control is its fail-safe one. The
    // thermostat's is normalised like a command (68 °F is 20 °C).
    assert_eq!(actions[0].control.command, "battery:set-reserve");
    assert_eq!(actions[1].control.input["heatTarget"], json!(20.0));
    assert!(events.contains(&SafetyEvent::FailsafeEntered {
        link_down_since: T0 + 10,
        command: "thermostat:set-operating-mode".into()
    }));
    assert_eq!(c.hold_until("bat-1"), None, "fail-safe ends the hold");
    assert!(c.in_failsafe("bat-1") && c.in_failsafe("th-1"));
    assert_eq!(
        settle(&mut c, T0 + 10_000).0,
        vec![],
        "entered once per outage"
    );
}

#[test]
fn reconnecting_alone_does_not_leave_failsafe_a_command_run_after_it_does() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.on_link(false, T0);
    settle(&mut c, T0 + WINDOW);
    // A command dispatched before fail-safe was entered ends after it: it does not count.
    assert_eq!(c.on_platform_success("bat-1", "cmd_0"), None);
    c.on_link(true, T0 + 500);
    assert!(
        c.in_failsafe("bat-1"),
        "the link alone does not end fail-safe"
    );
    c.on_dispatch("bat-1", "cmd_1", None, T0 + 510);
    assert!(c.in_failsafe("bat-1"), "not before the command has run");
    assert_eq!(
        c.on_platform_success("bat-1", "cmd_1"),
        Some(SafetyEvent::FailsafeLeft {
            command_id: "cmd_1".into()
        })
    );
    assert!(!c.in_failsafe("bat-1"));

    // The next outage enters fail-safe again.
    c.on_link(false, T0 + 600);
    assert_eq!(settle(&mut c, T0 + 600 + WINDOW).0.len(), 1);
}

#[test]
fn failsafe_survives_a_restart_and_its_control_is_applied_again() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.on_link(false, T0);
    settle(&mut c, T0 + WINDOW);
    let saved = c.persisted();
    assert!(saved.devices["bat-1"].failsafe);
    let mut after = controls(&[battery()], saved, T0 + 1_000);
    assert!(after.in_failsafe("bat-1"));
    let (actions, _) = settle(&mut after, T0 + 1_000);
    assert_eq!(
        actions.len(),
        1,
        "the device may have lost it in the same power cut"
    );
    assert_eq!(actions[0].reason, ControlReason::Failsafe);
}

#[test]
fn the_window_counts_from_the_start_when_the_link_never_comes_up() {
    let settings = SafetySettings {
        failsafe_after_secs: WINDOW,
    };
    let mut c = Controls::new(&[battery()], &settings, Persisted::default(), T0);
    assert_eq!(c.due(T0 + WINDOW - 1).0, vec![]);
    assert_eq!(c.due(T0 + WINDOW).0.len(), 1);
}

#[test]
fn a_failed_control_is_tried_again_and_reported_once() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.on_dispatch("bat-1", "cmd_1", Some(10), T0);
    let (actions, _) = c.due(T0 + 10);
    let first = &actions[0];
    let event = c.on_action_done(
        "bat-1",
        &first.id,
        Err("driver not running".into()),
        T0 + 10,
    );
    assert_eq!(
        event,
        Some(SafetyEvent::ControlFailed {
            reason: ControlReason::HoldExpired,
            command: "battery:set-reserve".into(),
            message: "driver not running".into(),
            retry_secs: RETRY_SECS
        })
    );
    assert_eq!(
        c.due(T0 + 10 + RETRY_SECS - 1).0,
        vec![],
        "not before the retry"
    );
    let (again, _) = c.due(T0 + 10 + RETRY_SECS);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].id, first.id, "each attempt has its own command id");
    assert_eq!(
        c.on_action_done("bat-1", &again[0].id, Err("still down".into()), T0 + 20),
        None,
        "one event per control, however often it is retried"
    );
    assert_eq!(
        c.hold_until("bat-1"),
        Some(T0 + 10),
        "lapsed, but not yet reverted"
    );
}

#[test]
fn a_control_replaced_by_a_platform_command_is_forgotten() {
    let mut c = controls(&[battery()], Persisted::default(), T0);
    c.on_dispatch("bat-1", "cmd_1", Some(10), T0);
    let (actions, _) = c.due(T0 + 10);
    c.on_dispatch("bat-1", "cmd_2", None, T0 + 11);
    let superseded = Err("superseded by command cmd_2".into());
    assert_eq!(
        c.on_action_done("bat-1", &actions[0].id, superseded, T0 + 11),
        None
    );
    assert_eq!(c.due(T0 + 100).0, vec![]);
}

#[test]
fn a_driver_is_told_the_hold_and_the_failsafe_control() {
    let c = controls(
        &[battery(), thermostat_with_failsafe()],
        Persisted::default(),
        T0,
    );
    let told = c.driver_safety("bat-1", Some(300), T0);
    assert_eq!(told.hold.as_ref().map(|h| h.until), Some(T0 + 300));
    assert_eq!(told.failsafe.as_ref().map(|f| f.after_secs), Some(WINDOW));
    let thermostat = c.driver_safety("th-1", None, T0);
    assert_eq!(thermostat.hold, None);
    assert!(thermostat.failsafe.is_some());
    assert!(c.driver_safety("other-1", None, T0).is_empty());
}

#[test]
fn bad_controls_are_refused_at_load_naming_the_entry() {
    let refused = |entry: DeviceLimits| {
        let r = validate_controls(&entry, 3).unwrap_err();
        format!("{}: {}", r.key, r.problem)
    };
    let bat = |c: Control| DeviceLimits {
        default_control: Some(c),
        ..battery()
    };
    assert_eq!(
        refused(bat(control(
            "battery:set-reserve",
            json!({"chargePercentage": 10})
        ))),
        "limits: limits #3 (bat-1): default_control: chargePercentage: 10 % is below the \
         installer limit min_backup_reserve = 20 % for bat-1"
    );
    assert_eq!(
        refused(bat(control(
            "vehicle:set-charge-limit",
            json!({"chargeLimit": 80})
        ))),
        "limits: limits #3 (bat-1): default_control: vehicle:set-charge-limit is not a command \
         for a battery"
    );
    assert_eq!(
        refused(bat(control("battery:set-reserve", json!({})))),
        "limits: limits #3 (bat-1): default_control: chargePercentage: missing; \
         battery:set-reserve requires it"
    );
    assert_eq!(
        refused(bat(control("battery:explode", json!({})))),
        "limits: limits #3 (bat-1): default_control: unknown command slug `battery:explode`"
    );
    assert_eq!(
        refused(DeviceLimits {
            failsafe_control: Some(control(
                "battery:set-reserve",
                json!({"chargePercentage": 30, "holdSecs": 60})
            )),
            ..battery()
        }),
        "limits: limits #3 (bat-1): failsafe_control: holdSecs: a control holds until the next \
         command"
    );
    validate_controls(&battery(), 3).unwrap();
    validate_controls(&thermostat_with_failsafe(), 3).unwrap();
}

#[test]
fn next_due_names_the_next_deadline_entry_or_retry_and_nothing_while_idle() {
    let mut c = controls(
        &[battery(), thermostat_with_failsafe()],
        Persisted::default(),
        T0,
    );
    assert_eq!(c.next_due(), None, "link up, no hold: nothing to wake for");
    c.on_dispatch("bat-1", "cmd_1", Some(30), T0);
    assert_eq!(c.next_due(), Some(T0 + 30));
    // The link goes down: fail-safe entry comes first.
    c.on_link(false, T0 + 5);
    assert_eq!(c.next_due(), Some(T0 + 5 + WINDOW).min(Some(T0 + 30)));
    c.on_link(true, T0 + 6);
    // The hold lapses; while its control runs nothing is due, and a failure schedules the retry.
    let (actions, _) = c.due(T0 + 30);
    assert_eq!(c.next_due(), None, "the control is running");
    c.on_action_done("bat-1", &actions[0].id, Err("busy".into()), T0 + 31);
    assert_eq!(c.next_due(), Some(T0 + 31 + RETRY_SECS));
    let (again, _) = c.due(T0 + 31 + RETRY_SECS);
    c.on_action_done("bat-1", &again[0].id, Ok(()), T0 + 37);
    assert_eq!(c.next_due(), None);
    // In fail-safe, with its controls applied, nothing more is due for this outage.
    c.on_link(false, T0 + 100);
    assert_eq!(c.next_due(), Some(T0 + 100 + WINDOW));
    let (entered, _) = c.due(T0 + 100 + WINDOW);
    assert_eq!(entered.len(), 2);
    for a in &entered {
        c.on_action_done(&a.device_id, &a.id, Ok(()), T0 + 100 + WINDOW);
    }
    assert_eq!(c.next_due(), None);
}
