//! The CALLs the central system sends one charge point, one at a time: OCPP-J 1.6 (4.1.1) says
//! a side should not send a CALL until its previous one is answered or has timed out, and
//! chargers that take two at once are not the ones to rely on. Pure: no socket, no clock of its
//! own.
//!
//! The CALLs each connection starts with (the profiles and triggers) go ahead of any command
//! queued before them, so on every connection the installer's `ChargePointMaxProfile` is sent
//! before any command is.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::frame;
use super::profiles::Standing;
use crate::drivers::CommandFailure;

/// Where a command's outcome goes.
pub(crate) type Done = oneshot::Sender<Result<Value, CommandFailure>>;

/// One CALL to send.
#[derive(Debug)]
pub(crate) struct Call {
    pub(crate) action: &'static str,
    pub(crate) payload: Value,
    /// The command waiting for the answer; none for the driver's own CALLs.
    pub(crate) done: Option<Done>,
    /// The limit that stands once the charger accepts this CALL (a SetChargingProfile of a
    /// charge limit).
    pub(crate) limit: Option<Standing>,
    /// This is the installer's `ChargePointMaxProfile`: with `require_max_profile`, its answer
    /// decides whether the charger may charge at all.
    pub(crate) installer_max: bool,
}

impl Call {
    /// One of the driver's own CALLs: no command waits for it.
    pub(crate) fn own(action: &'static str, payload: Value) -> Call {
        Call {
            action,
            payload,
            done: None,
            limit: None,
            installer_max: false,
        }
    }

    /// A SetChargingProfile of `standing`, sent at `now`; it becomes the standing limit once
    /// accepted.
    pub(crate) fn limit(standing: Standing, now: u64) -> Call {
        Call {
            limit: Some(standing),
            ..Call::own("SetChargingProfile", standing.profile(now))
        }
    }

    /// A command whose caller has gone (superseded, or past its timeout): nothing to send.
    fn abandoned(&self) -> bool {
        self.done.as_ref().is_some_and(oneshot::Sender::is_closed)
    }
}

/// The CALL sent and not yet answered.
#[derive(Debug)]
struct InFlight {
    unique_id: String,
    call: Call,
    sent: Instant,
}

/// One connection's CALLs: at most one in flight, the rest waiting in order.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    waiting: VecDeque<Call>,
    in_flight: Option<InFlight>,
}

impl Calls {
    /// Commands waiting or in flight (the driver's own CALLs do not count).
    pub(crate) fn commands(&self) -> usize {
        let in_flight = self.in_flight.iter().map(|f| &f.call);
        self.waiting
            .iter()
            .chain(in_flight)
            .filter(|c| c.done.is_some() && !c.abandoned())
            .count()
    }

    pub(crate) fn push(&mut self, call: Call) {
        self.waiting.push_back(call);
    }

    /// Puts `call` ahead of every waiting CALL.
    pub(crate) fn push_front(&mut self, call: Call) {
        self.waiting.push_front(call);
    }

    /// Puts `calls`, in their order, ahead of every waiting CALL.
    pub(crate) fn prepend(&mut self, calls: Vec<Call>) {
        for call in calls.into_iter().rev() {
            self.waiting.push_front(call);
        }
    }

    /// Whether nothing is in flight or waiting.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.is_none() && self.waiting.is_empty()
    }

    /// Whether a charge limit for `connector` is waiting or in flight: a newer limit than the
    /// standing one is on its way.
    pub(crate) fn has_limit(&self, connector: u32) -> bool {
        let in_flight = self.in_flight.iter().map(|f| &f.call);
        self.waiting
            .iter()
            .chain(in_flight)
            .any(|c| c.limit.is_some_and(|l| l.connector == connector) && !c.abandoned())
    }

    /// The next CALL's frame, when none is in flight, under the unique id `unique_id` gives.
    /// Commands abandoned while they waited are dropped unsent.
    /// `refresh` may rewrite the call first: a charge limit that waited is leased from the
    /// time it is sent, not from the time it was queued.
    pub(crate) fn next(
        &mut self,
        unique_id: impl FnOnce() -> String,
        refresh: impl FnOnce(&mut Call),
        now: Instant,
    ) -> Option<(String, &Call)> {
        if self.in_flight.is_some() {
            return None;
        }
        while let Some(mut call) = self.waiting.pop_front() {
            if call.abandoned() {
                continue;
            }
            refresh(&mut call);
            let unique_id = unique_id();
            let text = frame::call(&unique_id, call.action, call.payload.clone());
            let sent = self.in_flight.insert(InFlight {
                unique_id,
                call,
                sent: now,
            });
            return Some((text, &sent.call));
        }
        None
    }

    /// The CALL `unique_id` answers, if it is the one in flight.
    pub(crate) fn answered(&mut self, unique_id: &str) -> Option<Call> {
        match &self.in_flight {
            Some(f) if f.unique_id == unique_id => self.in_flight.take().map(|f| f.call),
            _ => None,
        }
    }

    /// The CALL in flight, once it has waited `timeout` for its answer.
    pub(crate) fn timed_out(&mut self, now: Instant, timeout: Duration) -> Option<Call> {
        match &self.in_flight {
            Some(f) if now.duration_since(f.sent) >= timeout => {
                self.in_flight.take().map(|f| f.call)
            }
            _ => None,
        }
    }

    /// Drops the driver's own waiting CALLs of `action` (the rest of the TriggerMessages, once
    /// one has shown the charger will not take them).
    pub(crate) fn drop_own(&mut self, action: &str) {
        self.waiting
            .retain(|c| c.done.is_some() || c.action != action);
    }

    /// Every CALL, in flight first: the connection has ended.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Call> + '_ {
        self.in_flight
            .take()
            .map(|f| f.call)
            .into_iter()
            .chain(self.waiting.drain(..))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn command(action: &'static str) -> (Call, oneshot::Receiver<Result<Value, CommandFailure>>) {
        let (done, rx) = oneshot::channel();
        let call = Call {
            done: Some(done),
            ..Call::own(action, json!({}))
        };
        (call, rx)
    }

    #[test]
    fn one_call_is_in_flight_until_it_is_answered_or_times_out() {
        let t0 = Instant::now();
        let mut calls = Calls::default();
        calls.push(Call::own(
            "TriggerMessage",
            json!({"requestedMessage": "Heartbeat"}),
        ));
        let (start, _start_rx) = command("RemoteStartTransaction");
        calls.push(start);
        assert_eq!(calls.commands(), 1);
        let (text, call) = calls.next(|| "ta-1".into(), |_| {}, t0).unwrap();
        assert_eq!(
            (text.as_str(), call.action),
            (
                r#"[2,"ta-1","TriggerMessage",{"requestedMessage":"Heartbeat"}]"#,
                "TriggerMessage"
            )
        );
        assert!(
            calls.next(|| "ta-2".into(), |_| {}, t0).is_none(),
            "one at a time"
        );
        assert!(
            calls.answered("ta-9").is_none(),
            "an answer to another CALL"
        );
        assert_eq!(calls.answered("ta-1").unwrap().action, "TriggerMessage");
        let (text, _) = calls.next(|| "ta-2".into(), |_| {}, t0).unwrap();
        assert!(text.starts_with(r#"[2,"ta-2","RemoteStartTransaction""#));
        assert!(calls
            .timed_out(t0 + Duration::from_secs(29), Duration::from_secs(30))
            .is_none());
        let late = calls.timed_out(t0 + Duration::from_secs(30), Duration::from_secs(30));
        assert_eq!(late.unwrap().action, "RemoteStartTransaction");
        assert!(
            calls.answered("ta-2").is_none(),
            "a late answer matches nothing"
        );
        assert_eq!(calls.commands(), 0);
    }

    #[test]
    fn an_abandoned_command_is_never_sent_and_draining_returns_the_rest_in_order() {
        let t0 = Instant::now();
        let mut calls = Calls::default();
        let (first, _first_rx) = command("SetChargingProfile");
        let (gone, gone_rx) = command("SetChargingProfile");
        let (last, _last_rx) = command("RemoteStopTransaction");
        calls.push(first);
        calls.push(gone);
        calls.push(last);
        drop(gone_rx);
        assert_eq!(calls.commands(), 2);
        let mut n = 0;
        let _ = calls.next(
            || {
                n += 1;
                format!("ta-{n}")
            },
            |_| {},
            t0,
        );
        let actions: Vec<_> = calls.drain().map(|c| c.action).collect();
        assert_eq!(
            actions,
            [
                "SetChargingProfile",
                "SetChargingProfile",
                "RemoteStopTransaction"
            ]
        );
        let mut calls = Calls::default();
        let (gone, gone_rx) = command("SetChargingProfile");
        let (last, _last_rx) = command("RemoteStopTransaction");
        calls.push(gone);
        calls.push(last);
        drop(gone_rx);
        calls.prepend(vec![
            Call::own("SetChargingProfile", json!({})),
            Call::own("TriggerMessage", json!({})),
        ]);
        let mut sent = Vec::new();
        while let Some((text, _)) = calls.next(|| format!("ta-{}", sent.len()), |_| {}, t0) {
            let unique_id = format!("ta-{}", sent.len());
            sent.push(text);
            calls.answered(&unique_id).unwrap();
        }
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert!(sent[0].contains("SetChargingProfile") && sent[1].contains("TriggerMessage"));
        assert!(sent[2].contains("RemoteStopTransaction"), "{sent:?}");
        assert!(calls.idle());
    }
}
