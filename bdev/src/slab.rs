//! A slab: entries addressed by a `u32` index that stays valid while the
//! entry is in use, reused after release, so steady state allocates
//! nothing. Parked parent I/Os (splits, RAID) live in one.
//!
//! Invariant: an index is handed out by `alloc` at most once until it is
//! released; entries are never moved or dropped while in use.

pub struct Slab<T> {
    entries: Vec<T>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T: Default> Slab<T> {
    /// A free entry's index: a released one (as it was left), or a new
    /// default entry.
    pub fn alloc(&mut self) -> u32 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.entries.push(T::default());
        (self.entries.len() - 1) as u32
    }
}

impl<T> Slab<T> {
    /// Makes `i` free for reuse.
    pub fn release(&mut self, i: u32) {
        debug_assert!((i as usize) < self.entries.len() && !self.free.contains(&i));
        self.free.push(i);
    }

    pub fn get(&self, i: u32) -> Option<&T> {
        self.entries.get(i as usize)
    }

    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.entries.get_mut(i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn indexes_are_reused_after_release() {
        let mut s: Slab<u32> = Slab::default();
        let a = s.alloc();
        let b = s.alloc();
        assert_ne!(a, b);
        *s.get_mut(a).unwrap() = 7;
        s.release(a);
        assert_eq!(s.alloc(), a, "reused");
        assert_eq!(s.get(a), Some(&7), "left as it was");
        assert!(s.get(9).is_none());
    }
}
