//! Model test for dots: random writes, commits, branches, checkouts, resets, branch and commit deletions, diffs
//! between commits, and send/receive (full and incremental) into a second pool, against a byte model. Crashes come
//! right after a flush, so the replayed dot catalog must equal the model exactly; every reopen is integrity-checked.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use blockmesh_engine::io::SimDevice;
use blockmesh_engine::{CommitId, CommitRequest, Error, Pool};
use common::{pattern, small_opts};
use proptest::prelude::*;

const SUBDOTS: [(&str, u64); 2] = [("a", 64 << 10), ("b", 32 << 10)];
const BRANCHES: [&str; 3] = ["master", "x", "y"];
const DOT: &str = "n/d";
type Bytes = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone)]
enum Action {
    Write { sub: u8, off: u16, len: u8, seed: u64 },
    Commit,
    Branch { name: u8, from: u8 },
    Checkout { name: u8 },
    Reset { to: u8 },
    DeleteBranch { name: u8 },
    DeleteCommit { which: u8 },
    Diff { from: u8, to: u8, sub: u8 },
    Send { which: u8 },
    FlushCrash { seed: u64 },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0u8..2, any::<u16>(), 1u8..24, any::<u64>()).prop_map(|(sub, off, len, seed)| Action::Write { sub, off, len, seed }),
        3 => Just(Action::Commit),
        2 => (0u8..3, any::<u8>()).prop_map(|(name, from)| Action::Branch { name, from }),
        2 => (0u8..3).prop_map(|name| Action::Checkout { name }),
        1 => any::<u8>().prop_map(|to| Action::Reset { to }),
        1 => (0u8..3).prop_map(|name| Action::DeleteBranch { name }),
        1 => any::<u8>().prop_map(|which| Action::DeleteCommit { which }),
        2 => (any::<u8>(), any::<u8>(), 0u8..2).prop_map(|(from, to, sub)| Action::Diff { from, to, sub }),
        2 => any::<u8>().prop_map(|which| Action::Send { which }),
        1 => any::<u64>().prop_map(|seed| Action::FlushCrash { seed }),
    ]
}

#[derive(Debug, Clone)]
struct ModelCommit {
    bytes: Bytes,
    parents: Vec<CommitId>,
}

struct Harness {
    dev: Arc<SimDevice>,
    pool: Option<Pool>,
    dst: Pool,
    /// Commits received by `dst`, in the order sent.
    received: Vec<CommitId>,
    current: String,
    heads: BTreeMap<String, (Bytes, Option<CommitId>)>,
    commits: BTreeMap<CommitId, ModelCommit>,
    order: Vec<CommitId>,
}

impl Harness {
    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn nth_commit(&self, i: u8) -> Option<CommitId> {
        (!self.order.is_empty()).then(|| self.order[i as usize % self.order.len()])
    }

    fn head_bytes(&self) -> Bytes {
        SUBDOTS
            .iter()
            .map(|(s, size)| {
                let mut b = vec![0u8; *size as usize];
                self.pool().dot_volume(DOT, Some(s)).unwrap().read(0, &mut b).unwrap();
                (s.to_string(), b)
            })
            .collect()
    }

    fn commit_bytes(pool: &Pool, c: CommitId) -> Bytes {
        SUBDOTS
            .iter()
            .map(|(s, size)| {
                let mut b = vec![0u8; *size as usize];
                pool.commit_volume(DOT, c, Some(s)).unwrap().read(0, &mut b).unwrap();
                (s.to_string(), b)
            })
            .collect()
    }

    /// The pool agrees with the model: current branch, every head, every commit.
    fn verify(&self) {
        let info = self.pool().dot(DOT).unwrap();
        assert_eq!(info.current_branch, self.current);
        let branches: Vec<&String> = info.branches.iter().map(|(b, _)| b).collect();
        assert_eq!(branches, self.heads.keys().collect::<Vec<_>>());
        for (b, head) in &info.branches {
            assert_eq!(*head, self.heads[b].1, "head commit of {b}");
        }
        assert!(self.head_bytes() == self.heads[&self.current].0, "head bytes of {}", self.current);
        let all = self.pool().commits(DOT).unwrap();
        assert_eq!(all.len(), self.commits.len());
        for c in &all {
            let m = &self.commits[&c.id];
            assert_eq!(c.parents, m.parents);
            assert!(Self::commit_bytes(self.pool(), c.id) == m.bytes, "commit {} changed", c.id);
        }
    }

    fn run(&mut self, a: &Action) {
        match a {
            Action::Write { sub, off, len, seed } => {
                let (s, size) = SUBDOTS[*sub as usize];
                let len = u64::from(*len) * 512;
                let off = u64::from(*off) * 512 % (size - len + 512) / 512 * 512;
                let data = pattern(*seed, len as usize);
                self.pool().dot_volume(DOT, Some(s)).unwrap().write(off, &data).unwrap();
                let head = self.heads.get_mut(&self.current).unwrap();
                head.0.get_mut(s).unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Action::Commit => {
                let req = CommitRequest { message: format!("c{}", self.order.len()), ..Default::default() };
                let id = self.pool().commit(DOT, req).unwrap();
                let head = self.heads.get_mut(&self.current).unwrap();
                let parents = head.1.into_iter().collect();
                self.commits.insert(id, ModelCommit { bytes: head.0.clone(), parents });
                head.1 = Some(id);
                self.order.push(id);
            }
            Action::Branch { name, from } => {
                let b = BRANCHES[*name as usize];
                let from = self.nth_commit(*from);
                match (self.pool().create_branch(DOT, b, from), from) {
                    (Ok(()), Some(c)) => {
                        assert!(!self.heads.contains_key(b));
                        self.heads.insert(b.to_string(), (self.commits[&c].bytes.clone(), Some(c)));
                    }
                    (Err(Error::BranchExists(_)), _) => assert!(self.heads.contains_key(b)),
                    (Err(_), None) => {}
                    (r, f) => panic!("branch {b} from {f:?}: {r:?}"),
                }
            }
            Action::Checkout { name } => {
                let b = BRANCHES[*name as usize];
                match self.pool().checkout(DOT, b) {
                    Ok(()) => self.current = b.to_string(),
                    Err(Error::NoSuchBranch(_)) => assert!(!self.heads.contains_key(b)),
                    Err(e) => panic!("checkout: {e}"),
                }
            }
            Action::Reset { to } => {
                let Some(c) = self.nth_commit(*to) else { return };
                self.pool().reset_branch(DOT, &self.current.clone(), c).unwrap();
                let bytes = self.commits[&c].bytes.clone();
                self.heads.insert(self.current.clone(), (bytes, Some(c)));
            }
            Action::DeleteBranch { name } => {
                let b = BRANCHES[*name as usize];
                match self.pool().delete_branch(DOT, b) {
                    Ok(()) => {
                        assert!(b != self.current);
                        self.heads.remove(b);
                    }
                    Err(_) => assert!(b == self.current || !self.heads.contains_key(b)),
                }
            }
            Action::DeleteCommit { which } => {
                let Some(c) = self.nth_commit(*which) else { return };
                let is_head = self.heads.values().any(|h| h.1 == Some(c));
                let is_parent = self.commits.values().any(|m| m.parents.contains(&c));
                match self.pool().delete_commit(DOT, c) {
                    Ok(()) => {
                        assert!(!is_head && !is_parent);
                        self.commits.remove(&c);
                        self.order.retain(|x| *x != c);
                    }
                    Err(_) => assert!(is_head || is_parent),
                }
            }
            Action::Diff { from, to, sub } => {
                let (Some(x), Some(y)) = (self.nth_commit(*from), self.nth_commit(*to)) else { return };
                let s = SUBDOTS[*sub as usize].0;
                let d = self.pool().diff_commits(DOT, x, Some(y), Some(s)).unwrap();
                let (bx, by) = (&self.commits[&x].bytes[s], &self.commits[&y].bytes[s]);
                for blk in 0..bx.len() / 4096 {
                    let r = blk * 4096..(blk + 1) * 4096;
                    if bx[r.clone()] != by[r] {
                        let off = blk as u64 * 4096;
                        assert!(
                            d.iter().any(|e| e.offset_bytes <= off && off < e.offset_bytes + e.len_bytes),
                            "block {blk} differs but is not in the diff"
                        );
                    }
                }
                if x == y {
                    assert!(d.is_empty());
                }
            }
            Action::Send { which } => {
                let Some(c) = self.nth_commit(*which) else { return };
                if self.received.contains(&c) {
                    return;
                }
                // incremental from a commit both sides have when there is one, else full
                let base = self.received.last().copied().filter(|b| self.commits.contains_key(b));
                let mut stream = Vec::new();
                self.pool().send(DOT, c, base, &mut stream).unwrap();
                self.dst.receive(&mut &stream[..]).unwrap();
                self.received.push(c);
                assert!(Self::commit_bytes(&self.dst, c) == self.commits[&c].bytes, "received commit differs");
            }
            Action::FlushCrash { seed } => {
                self.pool().flush().unwrap();
                let image = self.dev.crash(*seed);
                drop(self.pool.take());
                self.dev = image;
                let pool = Pool::open(self.dev.clone(), small_opts(1)).unwrap();
                let report = pool.check().unwrap();
                assert!(report.is_ok(), "{:?}", report.problems);
                self.pool = Some(pool);
                self.verify();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MODEL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    #[test]
    fn dots_match_model(actions in prop::collection::vec(action(), 1..50)) {
        let dev = SimDevice::new(24 << 20);
        let pool = Pool::create(dev.clone(), small_opts(1)).unwrap();
        pool.create_dot(DOT, &SUBDOTS).unwrap();
        let dst = Pool::create(SimDevice::new(24 << 20), small_opts(2)).unwrap();
        let empty: Bytes = SUBDOTS.iter().map(|(s, size)| (s.to_string(), vec![0u8; *size as usize])).collect();
        let mut heads = BTreeMap::new();
        heads.insert("master".to_string(), (empty, None));
        let mut h = Harness {
            dev, pool: Some(pool), dst, received: Vec::new(), current: "master".into(), heads,
            commits: BTreeMap::new(), order: Vec::new(),
        };
        for a in &actions {
            h.run(a);
        }
        h.verify();
        h.run(&Action::FlushCrash { seed: 0 });
        let report = h.dst.check().unwrap();
        prop_assert!(report.is_ok(), "{:?}", report.problems);
    }
}
