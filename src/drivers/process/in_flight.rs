//! The commands a running driver owes an answer: sending them, and forgetting abandoned ones.
//!
//! Bounded twice over, because a driver that never answers must not make the agent grow: at
//! most [`MAX_IN_FLIGHT`] answer channels, and commands are queued for the driver's stdin with
//! `try_send`, never awaited, so a driver that stops reading cannot stall its own stdout.

use std::collections::HashMap;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::protocol::{encode, ToDriver};
use crate::drivers::{CommandFailure, DriverCommand};

/// Commands sent to the driver and not yet answered. A driver that never answers would
/// otherwise accumulate answer channels for ever.
const MAX_IN_FLIGHT: usize = 64;

/// The answer channel of a command sent to the driver.
pub(super) type Answer = oneshot::Sender<Result<Value, CommandFailure>>;

/// Tells the command's caller it failed, and why.
pub(super) fn fail(answer: Answer, failure: CommandFailure) {
    // The caller may have stopped waiting; then there is nobody to tell.
    let _ = answer.send(Err(failure));
}

/// Queues `command` for the driver's stdin and remembers where its answer goes.
pub(super) fn send_command(
    command: DriverCommand,
    to_driver: &mpsc::Sender<Vec<u8>>,
    in_flight: &mut HashMap<String, Answer>,
) {
    if in_flight.contains_key(&command.command_id) {
        return fail(command.done, CommandFailure::DuplicateCommandId);
    }
    if in_flight.len() >= MAX_IN_FLIGHT {
        return fail(command.done, CommandFailure::DriverBusy);
    }
    let line = encode(&ToDriver::Command {
        command_id: &command.command_id,
        device_id: &command.device_id,
        slug: &command.slug,
        input: &command.input,
        hold: command.safety.hold.as_ref(),
        failsafe: command.safety.failsafe.as_ref(),
    });
    // try_send: a full queue means the driver is not reading its stdin, and a closed one that
    // it closed stdin; either way waiting would only stall the driver's stdout.
    match to_driver.try_send(line) {
        Ok(()) => {
            in_flight.insert(command.command_id, command.done);
        }
        Err(_) => fail(command.done, CommandFailure::DriverBusy),
    }
}

/// Forgets commands whose caller has stopped waiting (dropped its receiver, typically at its
/// deadline) and tells the driver to `cancel` them. Best effort: if the stdin queue is full the
/// cancel is skipped, and a late result is ignored anyway.
pub(super) fn cancel_abandoned(
    in_flight: &mut HashMap<String, Answer>,
    to_driver: &mpsc::Sender<Vec<u8>>,
) {
    in_flight.retain(|command_id, answer| {
        if !answer.is_closed() {
            return true;
        }
        let _ = to_driver.try_send(encode(&ToDriver::Cancel { command_id }));
        false
    });
}
