//! Quirk profiles: what a device family needs from the link that the standard does not say,
//! shipped by name (`[[drivers]] profile = "kostal-plenticore"`) so an installer does not have
//! to find it out on a roof, and every part of it overridable by the entry's own keys.
//!
//! Only quirks seen in the field are here, each with where it was reported. Two of the issues
//! installers meet need no profile, because discovery handles them for every device:
//! - SolarEdge's "models not found" (evcc #20482): its split-phase inverters carry model 102
//!   (and its meters sit further down the same chain, behind a second common model); any
//!   inverter model 101–103 or 111–113 anywhere in the chain is found.
//! - E3DC's model 803 (ha-sunspec #62): its length is no whole number of repeating groups; the
//!   walk follows the declared length and decodes only the fixed points.

use std::time::Duration;

use super::link::{LinkSettings, WriteMode, MAX_READ};
use crate::drivers::sunspec::models;

/// A point a device refuses to be written, though its model says it is writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PointRef {
    pub(crate) model: u16,
    pub(crate) point: &'static str,
}

/// A shipped profile: each `Some` replaces the default, and an entry's own key replaces it.
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) name: &'static str,
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) delay_after_connect_ms: Option<u64>,
    pub(crate) max_read: Option<u16>,
    pub(crate) pause_ms: Option<u64>,
    pub(crate) writes: Option<WriteMode>,
    pub(crate) no_write: &'static [PointRef],
}

const NONE: Profile = Profile {
    name: "",
    timeout_ms: None,
    delay_after_connect_ms: None,
    max_read: None,
    pause_ms: None,
    writes: None,
    no_write: &[],
};

/// The shipped profiles.
pub(crate) const PROFILES: &[Profile] = &[
    // Kostal Plenticore: function 16 on a single control register is answered with exception
    // 2, function 6 works (gosunspec #13, evcc PR #31487); and model 802's SoCRsvMin rejects
    // writes (evcc #10912), so the reserve goes to model 124's MinRsvPct where there is one.
    Profile {
        name: "kostal-plenticore",
        writes: Some(WriteMode::Single),
        no_write: &[PointRef {
            model: 802,
            point: "SoCRsvMin",
        }],
        ..NONE
    },
    // APsystems ECU-R: function 6 times out, function 16 works, even for one register
    // (pysunspec2 #104).
    Profile {
        name: "apsystems-ecu",
        writes: Some(WriteMode::Multiple),
        ..NONE
    },
];

/// The profile called `name`, or a message listing the ones there are.
pub(crate) fn profile(name: &str) -> Result<&'static Profile, String> {
    PROFILES.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
        format!(
            "{name:?} is not a profile; the profiles are {}",
            names.join(", ")
        )
    })
}

/// `MODEL.POINT` (as in `802.SoCRsvMin`) as a point of a model the agent knows.
pub(crate) fn point_ref(text: &str) -> Result<PointRef, String> {
    let (model, point) = text
        .split_once('.')
        .ok_or_else(|| format!("{text:?}: expected MODEL.POINT, as in \"802.SoCRsvMin\""))?;
    let id: u16 = model
        .parse()
        .map_err(|_| format!("{text:?}: {model:?} is not a model number"))?;
    let def = models::model(id)
        .ok_or_else(|| format!("{text:?}: model {id} is not one the agent reads or writes"))?;
    let point = def
        .points
        .iter()
        .find(|p| p.name == point)
        .ok_or_else(|| format!("{text:?}: model {id} has no point {point:?}"))?;
    Ok(PointRef {
        model: id,
        point: point.name,
    })
}

/// The quirks an entry asks for, each from its own key, else its profile, else the default.
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) delay_after_connect_ms: Option<u64>,
    pub(crate) max_read: Option<u16>,
    pub(crate) pause_ms: Option<u64>,
    pub(crate) writes: Option<WriteMode>,
    pub(crate) no_write: Option<Vec<PointRef>>,
}

/// What the link and the writes go by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quirks {
    pub(crate) link: LinkSettings,
    pub(crate) no_write: Vec<PointRef>,
}

impl Quirks {
    /// Whether `point` of model `model` may be written.
    pub(crate) fn writable(&self, model: u16, point: &str) -> bool {
        !self
            .no_write
            .iter()
            .any(|p| p.model == model && p.point == point)
    }
}

/// Resolves `own` over `profile` over the defaults.
pub(crate) fn resolve(profile: Option<&Profile>, own: &Overrides) -> Quirks {
    let p = profile.unwrap_or(&NONE);
    let default = LinkSettings::default();
    let ms = Duration::from_millis;
    Quirks {
        link: LinkSettings {
            timeout: own.timeout_ms.or(p.timeout_ms).map_or(default.timeout, ms),
            delay_after_connect: own
                .delay_after_connect_ms
                .or(p.delay_after_connect_ms)
                .map_or(default.delay_after_connect, ms),
            max_read: own.max_read.or(p.max_read).unwrap_or(MAX_READ),
            pause: own.pause_ms.or(p.pause_ms).map_or(default.pause, ms),
            writes: own.writes.or(p.writes).unwrap_or(default.writes),
        },
        no_write: own.no_write.clone().unwrap_or_else(|| p.no_write.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_names_real_points_and_sets_something() {
        for p in PROFILES {
            for r in p.no_write {
                let text = format!("{}.{}", r.model, r.point);
                assert_eq!(point_ref(&text), Ok(*r), "{}", p.name);
            }
            let resolved = resolve(Some(p), &Overrides::default());
            assert_ne!(resolved, resolve(None, &Overrides::default()), "{}", p.name);
        }
    }

    #[test]
    fn an_entry_s_own_keys_win_over_its_profile_and_the_profile_over_the_defaults() {
        let kostal = profile("kostal-plenticore").unwrap();
        let q = resolve(Some(kostal), &Overrides::default());
        assert_eq!(q.link.writes, WriteMode::Single);
        assert!(!q.writable(802, "SoCRsvMin"));
        assert!(q.writable(124, "MinRsvPct"));
        assert_eq!(q.link.timeout, Duration::from_millis(1_000));
        let own = Overrides {
            writes: Some(WriteMode::Auto),
            no_write: Some(vec![]),
            timeout_ms: Some(3_000),
            ..Overrides::default()
        };
        let q = resolve(Some(kostal), &own);
        assert_eq!(q.link.writes, WriteMode::Auto);
        assert!(q.writable(802, "SoCRsvMin"));
        assert_eq!(q.link.timeout, Duration::from_millis(3_000));
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        assert_eq!(
            profile("kostal").unwrap_err(),
            "\"kostal\" is not a profile; the profiles are kostal-plenticore, apsystems-ecu"
        );
        assert_eq!(
            point_ref("SoCRsvMin").unwrap_err(),
            "\"SoCRsvMin\": expected MODEL.POINT, as in \"802.SoCRsvMin\""
        );
        assert_eq!(
            point_ref("802.SocRsvMin").unwrap_err(),
            "\"802.SocRsvMin\": model 802 has no point \"SocRsvMin\""
        );
        assert_eq!(
            point_ref("64.X").unwrap_err(),
            "\"64.X\": model 64 is not one the agent reads or writes"
        );
    }
}
