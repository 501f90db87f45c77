//! Who holds which virtual IP: a control-plane record, `_VirtualIPs/trellis-system/
//! allocations` (`{"10.96.3.7": "shop/catalog", …}`), kept beside the Services.
//!
//! A replica checks new addresses against its followed catalog, which can lag a moment behind
//! another replica's write. So every apply that gives out or moves an address, and every
//! Service delete, rewrites this record in the same store batch, on the condition that it
//! is still at the version read. Two replicas assigning at the same moment then conflict
//! (one apply gets 409 and is simply applied again) instead of both giving out one address.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde_json::Value;
use trellis_model::resource::Spec;
use trellis_store::{Expect, Key, Store, StoreError, Write};

use crate::catalog::Catalog;

fn key() -> Key {
    Key::new("_VirtualIPs", "trellis-system", "allocations")
}

/// The record as read, and what this apply changes in it.
#[derive(Debug)]
pub(crate) struct Allocations {
    version: Option<u64>,
    ips: BTreeMap<Ipv4Addr, String>,
    changed: bool,
}

impl Allocations {
    /// Read the record; a mesh that has none yet starts from the catalog's Services.
    pub(crate) async fn read(store: &Store, current: &Catalog) -> Result<Self, StoreError> {
        let Some(o) = store.get(&key()).await? else {
            let ips = current
                .entries
                .values()
                .filter_map(|e| match &e.resource.spec {
                    Spec::Service(s) => Some((s.virtual_ip?, e.resource.id().to_string())),
                    _ => None,
                })
                .collect();
            return Ok(Self {
                version: None,
                ips,
                changed: false,
            });
        };
        let ips = o
            .doc
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(ip, owner)| Some((ip.parse().ok()?, owner.as_str()?.to_string())))
            .collect();
        Ok(Self {
            version: Some(o.version),
            ips,
            changed: false,
        })
    }

    /// The Service (`namespace/name`) that holds `ip`.
    pub(crate) fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.ips.get(&ip).map(String::as_str)
    }

    /// Whether `owner` may take `ip`: nobody holds it, or `owner` already does.
    pub(crate) fn free_for(&self, ip: Ipv4Addr, owner: &str) -> bool {
        self.owner(ip).is_none_or(|o| o == owner)
    }

    /// `owner` holds `ip`, and no other address.
    pub(crate) fn claim(&mut self, ip: Ipv4Addr, owner: &str) {
        if self.owner(ip) == Some(owner) && self.ips.values().filter(|o| *o == owner).count() == 1 {
            return;
        }
        self.release(owner);
        self.ips.insert(ip, owner.to_string());
        self.changed = true;
    }

    /// `owner` holds nothing.
    pub(crate) fn release(&mut self, owner: &str) {
        let before = self.ips.len();
        self.ips.retain(|_, o| o != owner);
        self.changed |= self.ips.len() != before;
    }

    /// The write that stores the changes, if any: only if the record is still as read.
    pub(crate) fn write(&self) -> Option<Write> {
        if !self.changed {
            return None;
        }
        let doc: serde_json::Map<String, Value> = self
            .ips
            .iter()
            .map(|(ip, o)| (ip.to_string(), Value::String(o.clone())))
            .collect();
        Some(Write {
            key: key(),
            doc: Some(Value::Object(doc)),
            expect: self.version.map_or(Expect::Absent, Expect::Version),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_holds_one_address_and_frees_it_when_released() {
        let mut a = Allocations {
            version: Some(7),
            ips: BTreeMap::new(),
            changed: false,
        };
        let (x, y): (Ipv4Addr, Ipv4Addr) =
            ("10.96.0.5".parse().unwrap(), "10.96.0.6".parse().unwrap());
        a.claim(x, "shop/catalog");
        assert!(!a.free_for(x, "shop/orders") && a.free_for(x, "shop/catalog"));
        // Moving to another address frees the first.
        a.claim(y, "shop/catalog");
        assert!(a.free_for(x, "shop/orders") && a.owner(y) == Some("shop/catalog"));
        a.release("shop/catalog");
        assert!(a.free_for(y, "shop/orders"));
        // Written only on the version read.
        let w = a.write().expect("changed");
        assert!(matches!(w.expect, Expect::Version(7)));
        let unchanged = Allocations {
            version: None,
            ips: BTreeMap::new(),
            changed: false,
        };
        assert!(unchanged.write().is_none());
    }
}
