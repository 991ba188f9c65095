//! The kinds of device slinfer serves on ([`DeviceKind`]) and a value per
//! kind ([`PerKind`]). The engine contract and the scheduler both speak of
//! device kinds and must not depend on each other, so the one definition
//! lives here. No dependencies beyond serde; nothing else belongs here.

use std::ops::{Index, IndexMut};

use serde::{Deserialize, Serialize};

/// What kind of processor a device is. The scheduler treats the two
/// differently (KV scaling, quotas, keep-alive, placement order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

impl DeviceKind {
    /// Both kinds, CPU first (the order placement tries them in).
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Cpu, DeviceKind::Gpu];

    /// `cpu` or `gpu`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value for each [`DeviceKind`], indexed by the kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PerKind<T> {
    pub cpu: T,
    pub gpu: T,
}

impl<T> PerKind<T> {
    pub const fn new(cpu: T, gpu: T) -> Self {
        PerKind { cpu, gpu }
    }

    /// The same value for both kinds.
    pub fn splat(v: T) -> Self
    where
        T: Clone,
    {
        PerKind {
            cpu: v.clone(),
            gpu: v,
        }
    }

    pub fn as_ref(&self) -> PerKind<&T> {
        PerKind {
            cpu: &self.cpu,
            gpu: &self.gpu,
        }
    }

    pub fn map<U>(self, mut f: impl FnMut(DeviceKind, T) -> U) -> PerKind<U> {
        PerKind {
            cpu: f(DeviceKind::Cpu, self.cpu),
            gpu: f(DeviceKind::Gpu, self.gpu),
        }
    }
}

impl<T> Index<DeviceKind> for PerKind<T> {
    type Output = T;
    fn index(&self, kind: DeviceKind) -> &T {
        match kind {
            DeviceKind::Cpu => &self.cpu,
            DeviceKind::Gpu => &self.gpu,
        }
    }
}

impl<T> IndexMut<DeviceKind> for PerKind<T> {
    fn index_mut(&mut self, kind: DeviceKind) -> &mut T {
        match kind {
            DeviceKind::Cpu => &mut self.cpu,
            DeviceKind::Gpu => &mut self.gpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_kind_indexes_by_kind() {
        let mut v = PerKind::new(1, 2);
        assert_eq!((v[DeviceKind::Cpu], v[DeviceKind::Gpu]), (1, 2));
        v[DeviceKind::Gpu] = 5;
        assert_eq!(
            v.map(|k, x| format!("{k}={x}")),
            PerKind::new("cpu=1".to_string(), "gpu=5".to_string())
        );
        assert_eq!(PerKind::splat(3), PerKind::new(3, 3));
        assert_eq!(DeviceKind::ALL.map(DeviceKind::name), ["cpu", "gpu"]);
    }
}
