//! Which events of the stream a consumer group's partition reads (see [`crate::group`] for the
//! hash and the leases): here, so that the reader needs nothing of the group machinery.

/// One partition of a group of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// The internal consumer name of this partition of `group`: `orders.p03` (two digits at
    /// least, as many as the largest index needs, so the names sort in partition order).
    pub fn name(&self, group: &str) -> String {
        let width = (self.count.max(2) - 1).to_string().len().max(2);
        format!("{group}.p{:0width$}", self.index)
    }

    /// Every partition of a group of `count`.
    pub fn all(count: u32) -> impl Iterator<Item = Partition> {
        (0..count).map(move |index| Partition { index, count })
    }
}
