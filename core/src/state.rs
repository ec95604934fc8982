//! The migration state machine: which states exist and which moves are legal.
//!
//! ```text
//!  Setup ──► Active ──► StopAndCopy ──► Completed
//!               │            │
//!               │            └────────► PostcopyActive ◄──► PostcopyPaused
//!               │                            │
//!               └─ Failed / Cancelled        └─► Completed / Failed
//! ```
//!
//! Every switchover passes through `StopAndCopy`, because the source guest is
//! paused during the handshake whether RAM then completes in the downtime or
//! follows in postcopy. Cancelling is possible until the guest may run on the
//! destination (before postcopy); from postcopy on, the guest's state is split
//! across both sides and only completion or failure can follow.

use core::fmt;

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationState {
    /// Connecting, negotiating capabilities and the RAM layout.
    Setup,
    /// Precopy rounds: the guest runs on the source while pages stream.
    Active,
    /// The source guest is paused for the final copy and the handshake.
    StopAndCopy,
    /// The guest runs on the destination; the rest streams or is fetched.
    PostcopyActive,
    /// Postcopy lost its connection; both sides hold their state for recovery.
    PostcopyPaused,
    /// Everything arrived; the guest runs on the destination only.
    Completed,
    /// The migration failed; see the report for which side may run the guest.
    Failed,
    /// The operator cancelled before switchover; the guest runs on the source.
    Cancelled,
}

impl MigrationState {
    /// A short lower-case name, for reports.
    pub const fn name(self) -> &'static str {
        match self {
            MigrationState::Setup => "setup",
            MigrationState::Active => "active",
            MigrationState::StopAndCopy => "stop-and-copy",
            MigrationState::PostcopyActive => "postcopy-active",
            MigrationState::PostcopyPaused => "postcopy-paused",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }

    /// True for the states a migration never leaves.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }

    /// True in the postcopy states, where the guest's memory is split
    /// between the two sides.
    pub const fn is_postcopy(self) -> bool {
        matches!(
            self,
            MigrationState::PostcopyActive | MigrationState::PostcopyPaused
        )
    }

    /// Whether moving from `self` to `to` is legal.
    pub const fn can_move_to(self, to: MigrationState) -> bool {
        use MigrationState::*;
        matches!(
            (self, to),
            (Setup, Active | Failed | Cancelled)
                | (Active, StopAndCopy | Failed | Cancelled)
                | (StopAndCopy, Completed | PostcopyActive | Failed | Cancelled)
                | (PostcopyActive, PostcopyPaused | Completed | Failed)
                | (PostcopyPaused, PostcopyActive | Failed)
        )
    }

    /// Every state, for exhaustive tests and tables.
    pub const ALL: [MigrationState; 8] = [
        MigrationState::Setup,
        MigrationState::Active,
        MigrationState::StopAndCopy,
        MigrationState::PostcopyActive,
        MigrationState::PostcopyPaused,
        MigrationState::Completed,
        MigrationState::Failed,
        MigrationState::Cancelled,
    ];
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An attempted move the state machine does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IllegalTransition {
    /// The state the migration was in.
    pub from: MigrationState,
    /// The state it was asked to move to.
    pub to: MigrationState,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a migration cannot move from {} to {}",
            self.from, self.to
        )
    }
}

impl core::error::Error for IllegalTransition {}

/// The current state, changed only through legal transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateMachine {
    state: MigrationState,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    /// A migration in `Setup`.
    pub const fn new() -> StateMachine {
        StateMachine {
            state: MigrationState::Setup,
        }
    }

    /// A migration whose postcopy lost its connection, as the side that
    /// resumes it takes it up: in `PostcopyPaused`.
    pub const fn postcopy_paused() -> StateMachine {
        StateMachine {
            state: MigrationState::PostcopyPaused,
        }
    }

    /// The current state.
    pub const fn state(&self) -> MigrationState {
        self.state
    }

    /// Moves to `to` and returns the previous state, or refuses an illegal
    /// move and stays where it is.
    pub fn move_to(&mut self, to: MigrationState) -> Result<MigrationState, IllegalTransition> {
        let from = self.state;
        if from.can_move_to(to) {
            self.state = to;
            Ok(from)
        } else {
            Err(IllegalTransition { from, to })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MigrationState::*;
    use super::*;

    #[test]
    fn precopy_path() {
        let mut m = StateMachine::new();
        assert_eq!(m.move_to(Active), Ok(Setup));
        assert_eq!(m.move_to(StopAndCopy), Ok(Active));
        assert_eq!(m.move_to(Completed), Ok(StopAndCopy));
        assert!(m.state().is_terminal());
    }

    #[test]
    fn postcopy_path_with_pause_and_recovery() {
        let mut m = StateMachine::new();
        for s in [
            Active,
            StopAndCopy,
            PostcopyActive,
            PostcopyPaused,
            PostcopyActive,
            Completed,
        ] {
            assert!(m.move_to(s).is_ok(), "to {s}");
        }
    }

    #[test]
    fn illegal_moves_are_errors_and_change_nothing() {
        let mut m = StateMachine::new();
        assert_eq!(
            m.move_to(Completed),
            Err(IllegalTransition {
                from: Setup,
                to: Completed
            })
        );
        assert_eq!(m.state(), Setup);
        m.move_to(Active).unwrap();
        // Postcopy only after the source has stopped.
        assert!(m.move_to(PostcopyActive).is_err());
        m.move_to(StopAndCopy).unwrap();
        m.move_to(PostcopyActive).unwrap();
        // The guest's state is split: no cancelling, no going back.
        assert!(m.move_to(Cancelled).is_err());
        assert!(m.move_to(Active).is_err());
        assert_eq!(m.state(), PostcopyActive);
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in MigrationState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_terminal())
        {
            for to in MigrationState::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn transition_table() {
        // The whole table, spelled out: rows are `from`, columns `to` in
        // MigrationState::ALL order.
        const TABLE: [[u8; 8]; 8] = [
            // Se Ac SC PA PP Co Fa Ca
            [0, 1, 0, 0, 0, 0, 1, 1], // Setup
            [0, 0, 1, 0, 0, 0, 1, 1], // Active
            [0, 0, 0, 1, 0, 1, 1, 1], // StopAndCopy
            [0, 0, 0, 0, 1, 1, 1, 0], // PostcopyActive
            [0, 0, 0, 1, 0, 0, 1, 0], // PostcopyPaused
            [0, 0, 0, 0, 0, 0, 0, 0], // Completed
            [0, 0, 0, 0, 0, 0, 0, 0], // Failed
            [0, 0, 0, 0, 0, 0, 0, 0], // Cancelled
        ];
        for (r, from) in MigrationState::ALL.iter().enumerate() {
            for (c, to) in MigrationState::ALL.iter().enumerate() {
                assert_eq!(from.can_move_to(*to), TABLE[r][c] == 1, "{from} -> {to}");
            }
        }
    }
}
