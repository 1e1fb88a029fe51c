//! Shard-local string interning with reference counts, so a series stores 4-byte ids instead of
//! 16-byte fat pointers, and strings of expired series are freed.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;

/// Interned strings by id.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<Arc<str>, u32, RandomState>,
    strs: Vec<Arc<str>>,
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl Interner {
    /// The id of `s`, taking one reference.
    pub fn acquire(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            if let Some(r) = self.refs.get_mut(id as usize) {
                *r = r.saturating_add(1);
            }
            return id;
        }
        let a: Arc<str> = Arc::from(s);
        let id = match self.free.pop() {
            Some(id) => {
                self.strs[id as usize] = a.clone();
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.strs.push(a.clone());
                self.refs.push(1);
                (self.strs.len() - 1) as u32
            }
        };
        self.ids.insert(a, id);
        id
    }

    /// Drops one reference; the string is freed with its last one.
    pub fn release(&mut self, id: u32) {
        let Some(r) = self.refs.get_mut(id as usize) else {
            return;
        };
        *r = r.saturating_sub(1);
        if *r == 0 {
            if let Some(s) = self.strs.get_mut(id as usize) {
                self.ids.remove(&**s);
                *s = Arc::from("");
            }
            self.free.push(id);
        }
    }

    pub fn get(&self, id: u32) -> &str {
        self.strs.get(id as usize).map_or("", |s| s)
    }

    /// Live strings.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_shared_and_freed_with_their_last_reference() {
        let mut i = Interner::default();
        let a = i.acquire("GET /cart");
        let b = i.acquire("GET /cart");
        assert_eq!(a, b);
        assert_eq!(i.get(a), "GET /cart");
        i.release(a);
        assert_eq!(i.len(), 1);
        i.release(b);
        assert_eq!(i.len(), 0);
        let c = i.acquire("POST /pay");
        assert_eq!(c, a, "the id is reused");
        assert_eq!(i.get(c), "POST /pay");
    }
}
