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
use std::ops::Range;

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
    let Some(interior) =
        aligned_interior(buffer.as_mut_ptr() as usize, std::mem::size_of_val(buffer))
    else {
        return false;
    };
    // SAFETY: `interior` lies inside `buffer` (`aligned_interior` never
    // widens the range it is given), which the caller exclusively borrows;
    // MADV_HUGEPAGE only changes how the kernel backs those pages, never
    // their contents, and the range is page-aligned.
    let rc = unsafe {
        libc::madvise(
            interior.start as *mut libc::c_void,
            interior.len(),
            libc::MADV_HUGEPAGE,
        )
    };
    rc == 0
}

/// The whole 2 MiB pages inside the `len_bytes` bytes at address `start`:
/// from `start` rounded up to 2 MiB to the end rounded down. `None` when
/// that holds no whole page (or the range would pass the end of the address
/// space). The result never reaches outside `start..start + len_bytes`.
fn aligned_interior(start: usize, len_bytes: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len_bytes)?;
    let aligned_start = start.checked_next_multiple_of(HUGE_PAGE)?;
    let aligned_end = end - end % HUGE_PAGE;
    (aligned_start < aligned_end).then_some(aligned_start..aligned_end)
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

    const MIB: usize = 1 << 20;

    #[test]
    fn aligned_interior_is_the_whole_huge_pages_inside() {
        // Unaligned start and end: both rounded inwards.
        assert_eq!(
            aligned_interior(2 * MIB + 4096, 6 * MIB),
            Some(4 * MIB..8 * MIB)
        );
        assert_eq!(aligned_interior(16, 8 * MIB), Some(2 * MIB..8 * MIB));
        // Exactly aligned: the whole buffer.
        assert_eq!(aligned_interior(2 * MIB, 4 * MIB), Some(2 * MIB..6 * MIB));
        assert_eq!(aligned_interior(4 * MIB, 2 * MIB), Some(4 * MIB..6 * MIB));
        assert_eq!(aligned_interior(0, 2 * MIB), Some(0..2 * MIB));
        // Aligned start, unaligned end, and the other way round.
        assert_eq!(
            aligned_interior(2 * MIB, 4 * MIB + 1),
            Some(2 * MIB..6 * MIB)
        );
        assert_eq!(
            aligned_interior(2 * MIB - 1, 2 * MIB + 1),
            Some(2 * MIB..4 * MIB)
        );
        // Smaller than a huge page: nothing, aligned or not.
        assert_eq!(aligned_interior(2 * MIB, 2 * MIB - 1), None);
        assert_eq!(aligned_interior(4096, 4096), None);
        assert_eq!(aligned_interior(2 * MIB, 0), None);
        assert_eq!(aligned_interior(3, 0), None);
        // Straddling one boundary without holding a whole page.
        assert_eq!(aligned_interior(2 * MIB - 4096, 8192), None);
        assert_eq!(aligned_interior(MIB, 2 * MIB), None);
        assert_eq!(aligned_interior(2 * MIB - 1, 2 * MIB), None);
        // At the top of the address space: no overflow, no page past it.
        assert_eq!(aligned_interior(usize::MAX - 100, 100), None);
        assert_eq!(aligned_interior(usize::MAX - 100, 1000), None);
        let top_page = usize::MAX - (HUGE_PAGE - 1);
        assert_eq!(aligned_interior(top_page - 1, HUGE_PAGE), None);
        // Never wider than the range given.
        for start in [0, 1, 4095, MIB, 2 * MIB - 1, 2 * MIB, 3 * MIB + 17] {
            for len in [0, 1, MIB, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1, 5 * MIB + 3] {
                if let Some(r) = aligned_interior(start, len) {
                    assert!(start <= r.start && r.end <= start + len, "{start} {len}");
                    assert_eq!((r.start % HUGE_PAGE, r.end % HUGE_PAGE), (0, 0));
                    assert!(r.len() >= HUGE_PAGE);
                }
            }
        }
    }

    /// An anonymous private mapping of its own, so no other allocation
    /// shares (or merges its advice into) the VMAs the test reads; unmapped
    /// on drop.
    struct Mapping {
        addr: *mut libc::c_void,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize) -> Mapping {
            // SAFETY: an anonymous mapping at an address the kernel picks
            // touches no existing memory; the result is checked below.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED, "mmap {len} bytes");
            Mapping { addr, len }
        }

        /// The `count` u64s at `offset` bytes into the mapping, borrowed
        /// from it.
        fn u64s_at(&mut self, offset: usize, count: usize) -> &mut [MaybeUninit<u64>] {
            assert!(offset % 8 == 0 && offset + count * 8 <= self.len);
            // SAFETY: `offset` lies inside the mapping (asserted above), so
            // the pointer stays within one allocated object.
            let start = unsafe { self.addr.cast::<u8>().add(offset) };
            // SAFETY: the range lies inside the mapping (asserted above),
            // which is readable, writable and u64-aligned at `offset`; the
            // slice borrows `self` mutably, so nothing else reads or writes
            // it meanwhile and it ends before the mapping is unmapped.
            unsafe { std::slice::from_raw_parts_mut(start.cast::<MaybeUninit<u64>>(), count) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: `addr..addr + len` is the mapping made in `new`, and
            // no slice of it outlives this `&mut self`.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }

    /// One VMA of `/proc/self/smaps`: its address range and its `VmFlags`.
    struct Vma {
        range: Range<usize>,
        flags: Vec<String>,
    }

    /// The process's VMAs, from `/proc/self/smaps`: a line `start-end perms
    /// ...` opens each, and its `VmFlags:` line lists its flags.
    fn vmas() -> Vec<Vma> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
        let mut vmas: Vec<Vma> = Vec::new();
        for line in smaps.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                let vma = vmas.last_mut().expect("VmFlags before any mapping");
                vma.flags = flags.split_whitespace().map(String::from).collect();
            } else if let Some(range) = vma_range(line) {
                vmas.push(Vma {
                    range,
                    flags: Vec::new(),
                });
            }
        }
        vmas
    }

    /// The address range of an smaps header line (`7f12a000-7f12c000 rw-p
    /// ...`); `None` for the `Key: value` lines.
    fn vma_range(line: &str) -> Option<Range<usize>> {
        let (range, _) = line.split_once(' ')?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        Some(start..end)
    }

    fn vma_holding(vmas: &[Vma], addr: usize) -> &Vma {
        vmas.iter()
            .find(|v| v.range.contains(&addr))
            .unwrap_or_else(|| panic!("no VMA holds {addr:#x}"))
    }

    fn is_huge_page_advised(vma: &Vma) -> bool {
        vma.flags.iter().any(|f| f == "hg")
    }

    /// THP is usable unless the kernel lacks it or it is `[never]`.
    fn transparent_huge_pages() -> Option<String> {
        let enabled =
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
        (!enabled.contains("[never]")).then(|| enabled.trim().to_string())
    }

    #[test]
    fn advice_covers_only_the_aligned_interior_and_keeps_contents() {
        // Too small for one aligned huge page: nothing to advise.
        let mut small = vec![MaybeUninit::<u64>::uninit(); 1024];
        assert!(!advise_huge_pages(&mut small));

        // A 6 MiB buffer starting 64 KiB past a 2 MiB boundary, inside a
        // 10 MiB mapping of its own: its aligned interior is the two whole
        // huge pages after that boundary, with 2 MiB - 64 KiB of the buffer
        // before it and 64 KiB after it.
        let mut mapping = Mapping::new(10 * MIB);
        let boundary = (mapping.addr as usize).next_multiple_of(HUGE_PAGE);
        let start = boundary + 64 * 1024;
        let elements = 6 * MIB / size_of::<u64>();
        // `boundary` is at most 2 MiB - 4 KiB past the mapping's start, so
        // the buffer ends at most 8 MiB + 60 KiB into it.
        let buffer = mapping.u64s_at(start - mapping.addr as usize, elements);
        let interior = aligned_interior(start, 6 * MIB).expect("two whole huge pages");
        assert_eq!(interior, boundary + HUGE_PAGE..boundary + 3 * HUGE_PAGE);

        for (i, slot) in buffer.iter_mut().enumerate() {
            slot.write(i as u64 ^ 0xa5a5);
        }
        let took = advise_huge_pages(buffer);
        // SAFETY: every slot was written above.
        let kept = buffer
            .iter()
            .enumerate()
            .all(|(i, s)| unsafe { s.assume_init() } == i as u64 ^ 0xa5a5);
        assert!(kept, "the advice changed the buffer's contents");

        match transparent_huge_pages() {
            None => eprintln!(
                "transparent huge pages unavailable (missing or [never]): \
                 not checking which VMAs the kernel advised"
            ),
            Some(thp) => {
                assert!(took, "THP is on ({thp}) but madvise refused");
                let vmas = vmas();
                let mut addr = interior.start;
                while addr < interior.end {
                    let vma = vma_holding(&vmas, addr);
                    assert!(
                        is_huge_page_advised(vma),
                        "{addr:#x} in {interior:#x?} not advised"
                    );
                    addr = vma.range.end;
                }
                for outside in [interior.start - 1, interior.end] {
                    assert!((start..start + 6 * MIB).contains(&outside));
                    let vma = vma_holding(&vmas, outside);
                    assert!(
                        !is_huge_page_advised(vma),
                        "{outside:#x}, outside {interior:#x?}, was advised too: {:#x?}",
                        vma.range
                    );
                }
            }
        }

        for (i, slot) in buffer.iter_mut().enumerate() {
            slot.write(i as u64);
        }
        // SAFETY: every slot was just written.
        let sum: u64 = buffer.iter().map(|s| unsafe { s.assume_init() }).sum();
        let n = elements as u64;
        assert_eq!(sum, n * (n - 1) / 2);
    }

    #[test]
    fn huge_page_slice_fills_every_element() {
        let s = huge_page_slice(3 << 20, |i| i as u32 ^ 0x5a5a);
        assert_eq!(s.len(), 3 << 20);
        assert!(s.iter().enumerate().all(|(i, v)| *v == i as u32 ^ 0x5a5a));
        assert!(huge_page_slice(0, |_| 1u8).is_empty());
    }
}
