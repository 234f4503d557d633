//! The participant's side of cross-shard carts: holding, pinning, extending and settling
//! a share of a cart that another shard (its home) coordinates.
//!
//! A share is an ordinary hold record marked as a participant's, plus the cart's
//! coordinator and transaction numbers. A participant acts only on the transaction it
//! knows, so a message handled twice, late or out of order changes nothing; every vote
//! and acknowledgement leaves only once the records it speaks of are durable. A finished
//! share is remembered until its cart expires, so that a duplicated `Prepare` cannot hold
//! (and late messages sell) it again. Like the rest of the engine, this module performs
//! no I/O and reads no clock.

use std::mem;

use stockplane_wire::{HoldId, Status};

use super::{Hold, Participation, Phase, Shard};
use crate::peer::{Decision, PeerLine, PeerMessage};
use crate::route::{shard_for, ShardId};
use crate::wal::{Lines, WalRecord};
use crate::Tick;

impl Shard {
    /// Holds the share for reserve `txn` unless this shard knows better; returns the vote.
    pub(super) fn participant_prepare(
        &mut self,
        from: ShardId,
        hold: u128,
        txn: u64,
        expires_at_ms: Tick,
        lines: &[PeerLine],
    ) -> Status {
        if let Some(slot) = self.find_hold(hold) {
            let live = self.hold_slab[slot as usize].phase.is_live();
            match self.participations.get(&slot).copied() {
                // A duplicate: vote again as before.
                Some(part) if part.reserve_txn == txn => {
                    return if live { Status::Ok } else { Status::HoldExpired };
                }
                // A late Prepare of a reserve the coordinator has since replaced.
                Some(part) if part.reserve_txn > txn => return Status::Conflict,
                // An older reserve of this cart that its coordinator abandoned.
                Some(_) if live => self.log(WalRecord::Released { hold }),
                Some(_) => {}
                // A single-shard hold of the same id lives here: the ids collide.
                None if live => return Status::Conflict,
                None => {}
            }
        }
        if let Some(&(reserve_txn, expires_at)) = self.forgotten_shares.get(&hold) {
            if txn <= reserve_txn && self.now < expires_at {
                // A duplicate of the Prepare of a share this shard finished and forgot.
                return if txn == reserve_txn { Status::HoldExpired } else { Status::Conflict };
            }
        }
        if !self.forgotten_shares_room() {
            return Status::Busy;
        }
        self.participant_try_hold(from, hold, txn, expires_at_ms, lines)
    }

    fn participant_try_hold(
        &mut self,
        from: ShardId,
        hold: u128,
        txn: u64,
        expires_at_ms: Tick,
        lines: &[PeerLine],
    ) -> Status {
        let shards = self.config.shards;
        if expires_at_ms <= self.now {
            return Status::HoldExpired;
        }
        if lines.iter().any(|l| shard_for(l.sku, shards) != self.config.shard) {
            return Status::WrongShard;
        }
        let triples = lines.iter().map(|l| (l.sku, l.location, l.qty));
        if let Err(status) = self.validate_lines(triples.clone()) {
            return status;
        }
        if let Err(status) = self.hold_capacity(lines.len()) {
            return status;
        }
        if let Err(status) = self.resolve_lines(triples) {
            return status;
        }
        let resolved = mem::take(&mut self.scratch_lines);
        self.log(WalRecord::Held {
            hold,
            expires_at_ms,
            fingerprint: 0,
            prepared_for: Some((from, txn)),
            lines: Lines::Slice(&resolved),
        });
        self.scratch_lines = resolved;
        Status::Ok
    }

    fn participant_of(&self, hold: u128) -> Option<(u32, Hold, Participation)> {
        let slot = self.find_hold(hold)?;
        let part = *self.participations.get(&slot)?;
        Some((slot, self.hold_slab[slot as usize], part))
    }

    /// Pins the share for commit attempt `txn` if it is live; returns the vote.
    pub(super) fn participant_pin(&mut self, hold: u128, txn: u64) -> Status {
        match self.participant_of(hold) {
            Some((_, record, part)) if record.phase == Phase::Pinned && part.pin_txn == txn => Status::Ok,
            // Only a newer commit attempt may pin: a late `Pin` of an abandoned attempt must
            // not take the pin from the attempt its coordinator may have decided to commit.
            Some((_, record, part)) if record.phase.is_live() && txn > part.reserve_txn && txn > part.pin_txn => {
                if record.phase != Phase::Pinned && record.expires_at <= self.now {
                    Status::HoldExpired
                } else {
                    self.log(WalRecord::Pinned { hold, txn });
                    Status::Ok
                }
            }
            _ => Status::HoldExpired,
        }
    }

    /// Moves the share's expiry for extend `txn` if it is live; returns the vote.
    pub(super) fn participant_extend(&mut self, hold: u128, txn: u64, expires_at_ms: Tick) -> Status {
        match self.participant_of(hold) {
            Some((_, record, part))
                if matches!(record.phase, Phase::Held | Phase::Prepared) && txn > part.reserve_txn =>
            {
                if record.expires_at < expires_at_ms {
                    self.log(WalRecord::Extended { hold, expires_at_ms });
                }
                Status::Ok
            }
            _ => Status::HoldExpired,
        }
    }

    /// Applies the coordinator's decision on `txn` (if it still concerns this share) and
    /// acknowledges it, whatever it was, so the coordinator stops resending.
    pub(super) fn participant_decide(&mut self, from: ShardId, hold: u128, txn: u64, decision: Decision) {
        if let Some((_, record, part)) = self.participant_of(hold) {
            let live = record.phase.is_live();
            match decision {
                Decision::Keep if record.phase == Phase::Prepared && txn == part.reserve_txn => {
                    self.log(WalRecord::Kept { hold })
                }
                Decision::Abort if live && txn == part.reserve_txn => self.log(WalRecord::Released { hold }),
                Decision::Commit { mask } if record.phase == Phase::Pinned && txn == part.pin_txn => {
                    self.log(WalRecord::Committed { hold, mask, at_ms: self.now })
                }
                Decision::Unpin if record.phase == Phase::Pinned && txn == part.pin_txn => {
                    self.log(WalRecord::Unpinned { hold });
                    if record.expires_at <= self.now {
                        // Its expiry passed while pinned: it expires now.
                        self.stats.expired += 1;
                        self.log(WalRecord::Expired { hold });
                    }
                }
                Decision::Release if live && txn >= part.reserve_txn => self.log(WalRecord::Released { hold }),
                _ => {}
            }
        }
        self.send_peer(from, PeerMessage::Ack { hold: HoldId(hold), txn });
    }

    pub(super) fn remember_forgotten_share(&mut self, hold: u128, reserve_txn: u64, expires_at: Tick) {
        if expires_at <= self.now {
            // Past its expiry, any message about the share is refused anyway.
            return;
        }
        if self.forgotten_shares.insert(hold, (reserve_txn, expires_at)).is_none() {
            self.forgotten_order.push_back(hold);
        }
    }

    /// Drops remembered shares whose cart has expired (oldest first); true while the
    /// memory of forgotten shares still has room for more. A full memory is never cut
    /// short: a share forgotten before its expiry could be held, and sold, a second time
    /// by a duplicated message, so new shares wait (`busy`) until old ones expire.
    fn forgotten_shares_room(&mut self) -> bool {
        while let Some(&oldest) = self.forgotten_order.front() {
            match self.forgotten_shares.get(&oldest) {
                Some(&(_, expires_at)) if expires_at > self.now => break,
                _ => {
                    self.forgotten_order.pop_front();
                    self.forgotten_shares.remove(&oldest);
                }
            }
        }
        self.forgotten_order.len() < (self.config.holds_max + self.config.holds_finished_max) as usize
    }
}
