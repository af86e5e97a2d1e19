//! The in-process group against plain arithmetic: each collective on 1-4 ranks with uneven
//! row counts, empty sends, rank-order sums (the same bits on every rank), and abort/recover.

use std::sync::Arc;
use std::thread;

use candle_core::{DType, Device, Result, Tensor};

use super::*;

/// Runs `body(rank handle)` on one thread per rank of a new group of `size`; results in
/// rank order.
fn on_ranks<T: Send + 'static>(size: usize, body: impl Fn(LocalGroup) -> T + Send + Sync + 'static) -> Vec<T> {
    on_ranks_with(LocalGroup::new(size), body)
}

/// Rank `r`'s test tensor: `[rows, 3]` with values that do not sum exactly in f32.
fn values(rank: usize, rows: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * 3).map(|i| 0.1 + (rank * 31 + i) as f32 * 1.37e-3).collect();
    Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap()
}

#[test]
fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() -> Result<()> {
    for size in 1..=4 {
        let got = on_ranks(size, move |g| {
            g.all_reduce_sum(&values(g.rank(), 5))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        });
        let mut want = values(0, 5);
        for r in 1..size {
            want = (want + values(r, 5))?;
        }
        for rank_result in &got {
            assert_eq!(rank_result, &want.to_vec2::<f32>()?, "{size} ranks");
        }
    }
    Ok(())
}

#[test]
fn gather_scatter_and_broadcast_place_rows_by_rank() -> Result<()> {
    let results = on_ranks(3, |g| {
        let mine = values(g.rank(), 2);
        let gathered = g.all_gather(&mine).unwrap();
        let scattered = g.reduce_scatter_sum(&values(g.rank(), 6)).unwrap();
        let root = g.broadcast(&mine, 1).unwrap();
        (gathered, scattered, root)
    });
    let want_gather = Tensor::cat(&[values(0, 2), values(1, 2), values(2, 2)], 0)?;
    let total = ((values(0, 6) + values(1, 6))? + values(2, 6))?;
    for (rank, (gathered, scattered, root)) in results.iter().enumerate() {
        assert_eq!(gathered.to_vec2::<f32>()?, want_gather.to_vec2::<f32>()?);
        assert_eq!(
            scattered.to_vec2::<f32>()?,
            total.narrow(0, rank * 2, 2)?.to_vec2::<f32>()?
        );
        assert_eq!(root.to_vec2::<f32>()?, values(1, 2).to_vec2::<f32>()?);
    }
    Ok(())
}

#[test]
fn all_to_all_moves_uneven_rows_and_empty_sends() -> Result<()> {
    // Rank r sends (r + p) % 3 rows to rank p: some sends are empty.
    let size = 3;
    let sends = move |r: usize| -> Vec<usize> { (0..size).map(|p| (r + p) % 3).collect() };
    let got = on_ranks(size, move |g| {
        let r = g.rank();
        let send = sends(r);
        let x = values(r, send.iter().sum());
        let recv = exchange_counts(&g, &send, &Device::Cpu).unwrap();
        let recv_counts: Vec<usize> = recv.iter().map(|c| c[r]).collect();
        g.all_to_all(&x, &send, &recv_counts).unwrap().to_vec2::<f32>().unwrap()
    });
    for (p, rows) in got.iter().enumerate() {
        // What p gets: from each source r, the rows r addressed to p.
        let mut want = Vec::new();
        for r in 0..size {
            let send = sends(r);
            let offset: usize = send[..p].iter().sum();
            let x = values(r, send.iter().sum()).to_vec2::<f32>()?;
            want.extend(x[offset..offset + send[p]].iter().cloned());
        }
        assert_eq!(rows, &want, "rank {p}");
    }
    Ok(())
}

#[test]
fn mismatched_shapes_fail_on_every_rank_instead_of_hanging() {
    let errs = on_ranks(2, |g| {
        let x = Tensor::zeros((g.rank() + 1, 2), DType::F32, &Device::Cpu).unwrap();
        g.all_reduce_sum(&x).is_err()
    });
    assert_eq!(errs, vec![true, true]);
}

#[test]
fn abort_releases_waiting_ranks_and_recover_makes_the_group_usable() {
    let groups = LocalGroup::new(3);
    let (g0, g1, g2) = (groups[0].clone(), groups[1].clone(), groups[2].clone());
    // Ranks 0 and 1 wait in a collective that rank 2 never joins (it "failed").
    let waiting: Vec<_> = [g0.clone(), g1.clone()]
        .into_iter()
        .map(|g| thread::spawn(move || g.all_reduce_sum(&values(g.rank(), 1)).is_err()))
        .collect();
    thread::sleep(std::time::Duration::from_millis(50));
    g2.abort();
    g0.abort(); // a rank that saw the abort and gives up too: the first stays the cause
    for w in waiting {
        assert!(w.join().unwrap(), "a waiting rank must get an error after abort");
    }
    assert_eq!(g1.aborted_by(), Some(2));
    assert!(g2.all_gather(&values(2, 1)).is_err(), "collectives fail until recover");
    g2.recover().unwrap();
    assert_eq!(g0.aborted_by(), None);
    let again = on_ranks_with(vec![g0, g1, g2], |g| {
        g.all_reduce_sum(&values(0, 1)).unwrap().to_vec2::<f32>().unwrap()
    });
    let want = ((values(0, 1) * 3.0).unwrap()).to_vec2::<f32>().unwrap();
    for r in again {
        assert_eq!(r, want);
    }
}

/// Runs `body` on one thread per handle of `groups`.
fn on_ranks_with<T: Send + 'static>(
    groups: Vec<LocalGroup>,
    body: impl Fn(LocalGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let body = body.clone();
            thread::spawn(move || body(g))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_in_different_collectives_fail_instead_of_mixing_them() {
    let errs = on_ranks(2, |g| {
        let x = values(g.rank(), 2);
        if g.rank() == 0 {
            g.all_reduce_sum(&x).map(|_| ()).unwrap_err().to_string()
        } else {
            g.all_to_all(&x, &[1, 1], &[1, 1]).map(|_| ()).unwrap_err().to_string()
        }
    });
    assert!(errs[0].contains("rank 1 called all_to_all"), "{}", errs[0]);
    assert!(errs[1].contains("rank 0 called all_reduce"), "{}", errs[1]);
}

#[test]
fn single_rank_collectives_are_the_identity() -> Result<()> {
    let x = values(0, 4);
    let one = SingleRank;
    assert_eq!(one.all_reduce_sum(&x)?.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
    assert_eq!(one.all_to_all(&x, &[4], &[4])?.dims(), &[4, 3]);
    assert!(one.all_to_all(&x, &[3], &[3]).is_err());
    assert_eq!(exchange_counts(&one, &[7], &Device::Cpu)?, vec![vec![7]]);
    Ok(())
}
