//! Memory advice for large tables allocated once at start, and the prefetch
//! hint the reader gives before it touches them.
//!
//! Owns: `madvise(MADV_HUGEPAGE)` over an allocation the caller owns and has
//! not yet written, so the kernel backs it with 2 MiB pages where it can
//! (transparent huge pages in `madvise` mode, the common default). A flow
//! table of 24 MiB on 4 KiB pages misses the TLB on nearly every random
//! access; on huge pages it needs a dozen TLB entries. And [`prefetch`]: a
//! hint that a cache line will be read soon, so the misses of a batch's flows
//! overlap instead of following one another.
//! Never: changes the memory's contents or ownership; advises after setup.

use std::mem::MaybeUninit;

const HUGE_PAGE: usize = 2 << 20;

/// A slice of `len` elements, `fill(i)` each, on huge pages where the kernel
/// allows (advised before the first write, so the first touch can fault in
/// 2 MiB pages).
pub fn huge_page_slice<T>(len: usize, mut fill: impl FnMut(usize) -> T) -> Box<[T]> {
    let mut slice = Box::<[T]>::new_uninit_slice(len);
    advise_huge_pages(&mut slice);
    for (i, slot) in slice.iter_mut().enumerate() {
        slot.write(fill(i));
    }
    // SAFETY: the loop above wrote every one of the `len` elements.
    unsafe { slice.assume_init() }
}

/// Asks for huge pages over the 2 MiB-aligned part of `buffer`. Returns
/// whether the kernel took the advice; a refusal (THP off, an old kernel)
/// leaves ordinary pages and is not an error.
pub fn advise_huge_pages<T>(buffer: &mut [MaybeUninit<T>]) -> bool {
    let start = buffer.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buffer);
    let aligned_start = start.next_multiple_of(HUGE_PAGE);
    let aligned_end = end - end % HUGE_PAGE;
    if aligned_end <= aligned_start {
        return false;
    }
    // SAFETY: [aligned_start, aligned_end) lies inside `buffer`, which the
    // caller exclusively borrows; MADV_HUGEPAGE only changes how the kernel
    // backs those pages, never their contents, and the range is page-aligned.
    let rc = unsafe {
        libc::madvise(
            aligned_start as *mut libc::c_void,
            aligned_end - aligned_start,
            libc::MADV_HUGEPAGE,
        )
    };
    rc == 0
}

/// Asks the CPU to bring the cache line holding `value` into the cache.
/// Only a hint: it never faults, changes nothing and may be ignored; a no-op
/// on other architectures than x86-64.
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 needs SSE, which every x86-64 CPU has (it is in the
    // target's baseline features); it reads nothing architecturally and
    // cannot fault, and the address comes from a live reference anyway.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_covers_only_the_aligned_interior_and_keeps_contents() {
        // Too small for one aligned huge page: nothing to advise.
        let mut small = vec![MaybeUninit::<u64>::uninit(); 1024];
        assert!(!advise_huge_pages(&mut small));
        // 8 MiB: at least one whole aligned 2 MiB page inside. The kernel
        // may still refuse (THP off): then it says so, and nothing breaks.
        let mut big: Vec<MaybeUninit<u64>> = Vec::with_capacity(1 << 20);
        big.resize_with(1 << 20, MaybeUninit::uninit);
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let took = advise_huge_pages(&mut big);
        if thp.contains("[madvise]") || thp.contains("[always]") {
            assert!(took, "THP is on ({thp}) but madvise refused");
        }
        for (i, slot) in big.iter_mut().enumerate() {
            slot.write(i as u64);
        }
        // SAFETY: every slot was just written.
        let sum: u64 = big.iter().map(|s| unsafe { s.assume_init() }).sum();
        assert_eq!(sum, (1u64 << 20) * ((1 << 20) - 1) / 2);
    }

    #[test]
    fn huge_page_slice_fills_every_element() {
        let s = huge_page_slice(3 << 20, |i| i as u32 ^ 0x5a5a);
        assert_eq!(s.len(), 3 << 20);
        assert!(s.iter().enumerate().all(|(i, v)| *v == i as u32 ^ 0x5a5a));
        assert!(huge_page_slice(0, |_| 1u8).is_empty());
    }
}
