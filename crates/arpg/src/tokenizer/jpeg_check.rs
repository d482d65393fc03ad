//! A structural check of a JPEG file, run before decoding: the decoder (zune-jpeg, through
//! the `image` crate) fills missing or garbled entropy-coded data with grey instead of failing
//! (issue #17). So every scan is Huffman-decoded here block by block, without computing
//! pixels, and must hold exactly the blocks its frame calls for, with its restart markers in
//! turn and no value too large for its quantizer. Huffman codes resynchronise and a flipped
//! value bit keeps the structure, so some corruption (about 40% of single byte flips in scan
//! data) still cannot be seen.

use std::fmt;

/// What is wrong with a JPEG; `Display` gives "is a corrupt JPEG: ..." and the like, to follow
/// the file's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegError {
    pub kind: ErrorKind,
    /// What is wrong, and where (a byte offset, or a scan and its MCU count).
    pub detail: String,
}

/// The three ways a JPEG is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file ends before its end-of-image marker.
    Truncated,
    /// Bytes that no valid JPEG holds.
    Corrupt,
    /// A valid coding the `image` crate's decoder refuses anyway (arithmetic, lossless,
    /// hierarchical, 12-bit).
    Unsupported,
}

impl fmt::Display for JpegError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::Truncated => "a truncated JPEG",
            ErrorKind::Corrupt => "a corrupt JPEG",
            ErrorKind::Unsupported => "a JPEG of a kind the decoder does not support",
        };
        write!(f, "is {what}: {}", self.detail)
    }
}

impl std::error::Error for JpegError {}

type Res<T> = Result<T, JpegError>;

fn corrupt<T>(detail: impl Into<String>) -> Res<T> {
    Err(JpegError {
        kind: ErrorKind::Corrupt,
        detail: detail.into(),
    })
}

fn truncated<T>(detail: impl Into<String>) -> Res<T> {
    Err(JpegError {
        kind: ErrorKind::Truncated,
        detail: detail.into(),
    })
}

fn unsupported<T>(detail: impl Into<String>) -> Res<T> {
    Err(JpegError {
        kind: ErrorKind::Unsupported,
        detail: detail.into(),
    })
}

/// Checks a whole JPEG file held in memory, from SOI to EOI; bytes after EOI are ignored (as
/// decoders do). Memory: 8 bytes per block of each progressively coded component, so callers
/// should bound the frame size first.
pub fn validate(data: &[u8]) -> Res<()> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return corrupt("no start-of-image marker");
    }
    let mut st = State::default();
    let mut pos = 2;
    loop {
        let (code, at) = next_marker(data, pos)?;
        pos = at + 2;
        match code {
            0xD9 => return st.finish(),
            0xDA => {
                let seg = segment(data, pos, "SOS")?;
                let scan = st.start_scan(seg)?;
                pos = st.walk_scan(data, pos + 2 + seg.len(), &scan)?;
            }
            _ => pos = st.header_segment(data, code, at, pos)?,
        }
    }
}

/// The next marker at `pos`, after any fill bytes (FF); returns its code and the offset of
/// its last FF. Anything else there is garbage.
fn next_marker(data: &[u8], pos: usize) -> Res<(u8, usize)> {
    match data.get(pos) {
        None => {
            return truncated(format!(
                "the file ends at byte {pos} without an end-of-image marker"
            ))
        }
        Some(0xFF) => {}
        Some(_) => return corrupt(format!("stray data at byte {pos} where a marker should be")),
    }
    let mut i = pos;
    while data.get(i + 1) == Some(&0xFF) {
        i += 1;
    }
    match data.get(i + 1) {
        None => truncated(format!("the file ends at byte {} inside a marker", i + 1)),
        Some(&code) => Ok((code, i)),
    }
}

/// The payload of the length-prefixed segment whose length field is at `pos`.
fn segment<'a>(data: &'a [u8], pos: usize, name: &str) -> Res<&'a [u8]> {
    let Some(len) = data.get(pos..pos + 2) else {
        return truncated(format!(
            "the file ends inside the {name} segment at byte {pos}"
        ));
    };
    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
    if len < 2 {
        return corrupt(format!("{name} segment at byte {pos} has length {len}"));
    }
    match data.get(pos + 2..pos + len) {
        Some(seg) => Ok(seg),
        None => truncated(format!(
            "the file ends inside the {name} segment at byte {pos}"
        )),
    }
}

/// A canonical Huffman decoding table: a lookup of the first `FAST` bits for short codes, the
/// JPEG standard's max-code search (F.2.2.3) for the rest.
struct Huff {
    /// Per `FAST`-bit prefix that starts with a short code: its symbol, its length << 8 and,
    /// where the value bits that follow fit too, the length of both << 16; else 0.
    fast: [u32; 1 << FAST],
    /// Largest code of each length (-1 when none).
    maxcode: [i32; 17],
    /// Index into `vals` minus the first code, per length.
    offset: [i32; 17],
    vals: [u8; 256],
    /// DC tables' symbols are all value sizes; AC symbols are run << 4 | size.
    dc: bool,
}

const FAST: u32 = 10;

impl Huff {
    /// From DHT's 16 code counts and its symbols; refuses the impossible code-length sets
    /// the decoder refuses too (a length's codes running out, or the all-ones code used).
    fn new(counts: &[u8], syms: &[u8], dc: bool) -> Result<Box<Huff>, String> {
        let mut t = Box::new(Huff {
            fast: [0; 1 << FAST],
            maxcode: [-1; 17],
            offset: [0; 17],
            vals: [0; 256],
            dc,
        });
        t.vals[..syms.len()].copy_from_slice(syms);
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            t.offset[len as usize] = k as i32 - code;
            for &sym in &syms[k..k + n] {
                // After a length's codes, one must be left over for longer ones (as in
                // libjpeg and zune-jpeg): the all-ones code is never used.
                if code + 1 >= 1 << len {
                    return Err(format!("more codes of {len} bits or fewer than fit"));
                }
                if len <= FAST {
                    let shift = FAST - len;
                    let first = (code as usize) << shift;
                    let total = len + t.value_bits(sym);
                    let total = if total <= FAST { total } else { 0 };
                    let entry = total << 16 | len << 8 | sym as u32;
                    t.fast[first..first + (1 << shift)].fill(entry);
                }
                code += 1;
            }
            k += n;
            if n > 0 {
                t.maxcode[len as usize] = code - 1;
            }
            code <<= 1;
        }
        Ok(t)
    }

    /// Bits of value after a symbol's code (an end-of-band run's are read apart).
    fn value_bits(&self, sym: u8) -> u32 {
        if self.dc {
            sym as u32
        } else {
            (sym & 15) as u32
        }
    }
}

/// One image component of the frame.
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks across and down when coded alone (a non-interleaved scan).
    bw: usize,
    bh: usize,
}

struct Frame {
    progressive: bool,
    comps: Vec<Component>,
    /// MCUs across and down of an interleaved scan.
    mcux: usize,
    mcuy: usize,
}

/// What the markers so far have defined.
#[derive(Default)]
struct State {
    frame: Option<Frame>,
    dc: [Option<Box<Huff>>; 4],
    ac: [Option<Box<Huff>>; 4],
    /// Quantization tables, in zigzag order.
    qt: [Option<[u16; 64]>; 4],
    restart: usize,
    scans: usize,
    /// Per component and coefficient, the lowest bit coded so far (-1: none): the
    /// progression a complete image must finish.
    coded: Vec<[i8; 64]>,
    /// Per progressive component, a mask of the nonzero coefficients of each block: an AC
    /// refinement scan holds one correction bit for each (allocated at its first AC scan).
    nonzero: Vec<Vec<u64>>,
}

/// How a scan codes its blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

/// One component of a scan: its index in the frame, blocks per MCU and its tables.
struct ScanComp {
    c: usize,
    h: usize,
    v: usize,
    dc: usize,
    ac: usize,
    limits: Limits,
}

/// The largest value sizes (and DC value) the component's quantizers allow in a scan.
#[derive(Clone, Copy)]
struct Limits {
    dc_max: i32,
    dc_size: u8,
    ac_size: [u8; 64],
}

/// Every DCT coefficient of 8-bit samples is within +-1024, or 1.23 times that where an
/// encoder overshoots saturated pixels against ringing (mozjpeg): over its quantizer, a
/// larger value is garbage.
const COEF_MAX: u32 = 1280;

impl Limits {
    fn new(q: &[u16; 64], al: usize) -> Limits {
        // Magnitudes after the point transform (a shift by Al), rounding allowed for.
        let mag = |q: u16| ((COEF_MAX / q as u32 + 1) >> al) + 1;
        let bits = |m: u32, cap: u32| (32 - m.leading_zeros()).min(cap) as u8;
        let dc = mag(q[0]);
        Limits {
            dc_max: dc as i32,
            dc_size: bits(2 * dc, 11),
            ac_size: q.map(|q| bits(mag(q), 10)),
        }
    }

    /// No limit (a placeholder until the scan's tables are known).
    const NONE: Limits = Limits {
        dc_max: i32::MAX,
        dc_size: 11,
        ac_size: [10; 64],
    };
}

struct Scan {
    index: usize,
    kind: Kind,
    comps: Vec<ScanComp>,
    mcus: usize,
    ss: usize,
    se: usize,
}

impl State {
    /// Parses a segment other than SOS at the marker ending at `at`, whose length field is
    /// at `pos`; returns the offset after it.
    fn header_segment(&mut self, data: &[u8], code: u8, at: usize, pos: usize) -> Res<usize> {
        let name = |n: &str| format!("{n} segment at byte {at}");
        let seg = match code {
            0xC0..=0xC2 => segment(data, pos, "SOF")?,
            0xC4 => segment(data, pos, "DHT")?,
            0xDB => segment(data, pos, "DQT")?,
            0xDD => segment(data, pos, "DRI")?,
            0xE0..=0xEF | 0xFE => return Ok(pos + 2 + segment(data, pos, "APP/COM")?.len()),
            _ => return refuse_marker(code, at),
        };
        let r = match code {
            0xC4 => self.dht(seg),
            0xDB => self.dqt(seg),
            0xDD => self.dri(seg),
            _ => self.sof(code, seg),
        };
        r.map_err(|e| JpegError {
            kind: e.kind,
            detail: format!("{}: {}", name(marker_name(code)), e.detail),
        })?;
        Ok(pos + 2 + seg.len())
    }

    fn dht(&mut self, mut seg: &[u8]) -> Res<()> {
        while let Some((&tcth, rest)) = seg.split_first() {
            let (class, id) = ((tcth >> 4) as usize, (tcth & 15) as usize);
            if class > 1 || id > 3 {
                return corrupt(format!("invalid table class {class} / id {id}"));
            }
            let Some(counts) = rest.get(..16) else {
                return corrupt("too short");
            };
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            let Some(syms) = rest.get(16..16 + total).filter(|_| total <= 256) else {
                return corrupt(format!("{total} symbols do not fit"));
            };
            if class == 0 && syms.iter().any(|&s| s > 15) {
                return corrupt("a DC symbol over 15");
            }
            let t = Huff::new(counts, syms, class == 0).map_err(|e| JpegError {
                kind: ErrorKind::Corrupt,
                detail: format!("invalid Huffman table: {e}"),
            })?;
            let tables = if class == 0 {
                &mut self.dc
            } else {
                &mut self.ac
            };
            tables[id] = Some(t);
            seg = &rest[16 + total..];
        }
        Ok(())
    }

    fn dqt(&mut self, mut seg: &[u8]) -> Res<()> {
        while let Some((&pqtq, rest)) = seg.split_first() {
            let (pq, tq) = ((pqtq >> 4) as usize, (pqtq & 15) as usize);
            if pq > 1 || tq > 3 {
                return corrupt(format!("invalid precision {pq} / table id {tq}"));
            }
            let n = 64 * (pq + 1);
            let Some(vals) = rest.get(..n) else {
                return corrupt("too short");
            };
            let mut q = [0u16; 64];
            for (k, v) in q.iter_mut().enumerate() {
                *v = match pq {
                    0 => vals[k] as u16,
                    _ => u16::from_be_bytes([vals[2 * k], vals[2 * k + 1]]),
                };
            }
            // Table B.4: quantizers are 1..=255 (or 65535); a 0 erases its coefficient.
            if q.contains(&0) {
                return corrupt(format!("quantization table {tq} holds a 0"));
            }
            self.qt[tq] = Some(q);
            seg = &rest[n..];
        }
        Ok(())
    }

    fn dri(&mut self, seg: &[u8]) -> Res<()> {
        let [a, b] = seg else {
            return corrupt(format!("length {} instead of 4", seg.len() + 2));
        };
        self.restart = u16::from_be_bytes([*a, *b]) as usize;
        Ok(())
    }
}

fn marker_name(code: u8) -> &'static str {
    match code {
        0xC0 => "SOF0",
        0xC1 => "SOF1",
        0xC2 => "SOF2",
        0xC4 => "DHT",
        0xDB => "DQT",
        0xDD => "DRI",
        _ => "marker",
    }
}

/// Markers that cannot stand between segments, or codings the decoder cannot read.
fn refuse_marker(code: u8, at: usize) -> Res<usize> {
    let kind = match code {
        0xC3 => "lossless (SOF3)",
        0xC5..=0xC7 => "hierarchical (SOF5-7)",
        0xC9..=0xCB | 0xCD..=0xCF => "arithmetic-coded (SOF9-15)",
        0xCC => "arithmetic-coded (DAC)",
        0xDC => "height defined by a DNL marker",
        0xDE | 0xDF => "hierarchical (DHP/EXP)",
        0xD0..=0xD7 => {
            return corrupt(format!(
                "restart marker RST{} at byte {at} outside a scan",
                code - 0xD0
            ))
        }
        0xD8 => return corrupt(format!("a second start-of-image marker at byte {at}")),
        _ => return corrupt(format!("unexpected marker FF{code:02X} at byte {at}")),
    };
    unsupported(format!("{kind} at byte {at}"))
}

impl State {
    fn sof(&mut self, code: u8, seg: &[u8]) -> Res<()> {
        if self.frame.is_some() {
            return corrupt("a second frame header");
        }
        let [p, y1, y0, x1, x0, nf, rest @ ..] = seg else {
            return corrupt("too short");
        };
        if *p != 8 {
            return unsupported(format!("{p}-bit samples"));
        }
        let (height, width) = (
            u16::from_be_bytes([*y1, *y0]) as usize,
            u16::from_be_bytes([*x1, *x0]) as usize,
        );
        if height == 0 {
            return unsupported("height defined by a DNL marker");
        }
        let nf = *nf as usize;
        if width == 0 || nf == 0 {
            return corrupt(format!("width {width} with {nf} components"));
        }
        if nf > 4 {
            return unsupported(format!("{nf} components"));
        }
        if rest.len() != 3 * nf {
            return corrupt(format!("length {} for {nf} components", seg.len() + 2));
        }
        let mut comps: Vec<Component> = Vec::with_capacity(nf);
        for c in rest.chunks_exact(3) {
            let (id, h, v, tq) = (c[0], (c[1] >> 4) as usize, (c[1] & 15) as usize, c[2]);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                return corrupt(format!("component {id}: sampling {h}x{v}, table {tq}"));
            }
            if comps.iter().any(|c| c.id == id) {
                return corrupt(format!("component id {id} twice"));
            }
            let tq = tq as usize;
            comps.push(Component {
                id,
                h,
                v,
                tq,
                bw: 0,
                bh: 0,
            });
        }
        let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
        let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
        for c in &mut comps {
            // A.1.1: a component's size is the image's scaled by its sampling, rounded up.
            c.bw = (width * c.h).div_ceil(hmax).div_ceil(8);
            c.bh = (height * c.v).div_ceil(vmax).div_ceil(8);
        }
        self.coded = vec![[-1; 64]; nf];
        self.nonzero = vec![Vec::new(); nf];
        self.frame = Some(Frame {
            progressive: code == 0xC2,
            comps,
            mcux: width.div_ceil(8 * hmax),
            mcuy: height.div_ceil(8 * vmax),
        });
        Ok(())
    }

    /// Parses an SOS header and checks it against the frame, the tables defined so far and
    /// the progression of earlier scans.
    fn start_scan(&mut self, seg: &[u8]) -> Res<Scan> {
        self.scans += 1;
        let index = self.scans;
        let prefix = |e: JpegError| JpegError {
            kind: e.kind,
            detail: format!("scan {index}: {}", e.detail),
        };
        let Some(frame) = &self.frame else {
            return corrupt(format!("scan {index} comes before the frame header"));
        };
        let (mut comps, [ss, se, ah, al]) = parse_sos(frame, seg).map_err(prefix)?;
        let kind = scan_kind(frame.progressive, comps.len(), [ss, se, ah, al]).map_err(prefix)?;
        self.check_tables(frame, &comps, kind).map_err(prefix)?;
        for s in &mut comps {
            if let Some(q) = &self.qt[frame.comps[s.c].tq] {
                s.limits = Limits::new(q, al);
            }
        }
        let ids: Vec<u8> = comps.iter().map(|s| frame.comps[s.c].id).collect();
        let mcus = match comps.as_slice() {
            [one] => frame.comps[one.c].bw * frame.comps[one.c].bh,
            _ => frame.mcux * frame.mcuy,
        };
        if comps.iter().map(|s| s.h * s.v).sum::<usize>() > 10 {
            return Err(prefix(JpegError {
                kind: ErrorKind::Corrupt,
                detail: "more than 10 blocks per MCU".into(),
            }));
        }
        for (s, id) in comps.iter().zip(ids) {
            if let Some(coded) = self.coded.get_mut(s.c) {
                progression(coded, id, kind, [ss, se, ah, al]).map_err(prefix)?;
            }
        }
        Ok(Scan {
            index,
            kind,
            comps,
            mcus,
            ss,
            se,
        })
    }

    fn check_tables(&self, frame: &Frame, comps: &[ScanComp], kind: Kind) -> Res<()> {
        use Kind::*;
        let (dc, ac) = (
            matches!(kind, Sequential | DcFirst),
            matches!(kind, Sequential | AcFirst | AcRefine),
        );
        for s in comps {
            let fc = &frame.comps[s.c];
            if self.qt[fc.tq].is_none() {
                return corrupt(format!(
                    "component {} uses quantization table {}, which is not defined",
                    fc.id, fc.tq
                ));
            }
            for (used, class, id, t) in [(dc, "DC", s.dc, &self.dc), (ac, "AC", s.ac, &self.ac)] {
                if used && t[id].is_none() {
                    return corrupt(format!(
                        "component {} uses {class} Huffman table {id}, which is not defined",
                        fc.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// At EOI: every coefficient of every component must have been coded to its last bit,
    /// else scans are missing (a progressive file cut between scans, say).
    fn finish(&self) -> Res<()> {
        let Some(frame) = &self.frame else {
            return corrupt("no frame header before the end-of-image marker");
        };
        if self.scans == 0 {
            return corrupt("no scan before the end-of-image marker");
        }
        for (c, coded) in frame.comps.iter().zip(&self.coded) {
            if let Some(k) = coded.iter().position(|&b| b != 0) {
                return match coded[k] {
                    -1 => corrupt(format!(
                        "the image ends before coefficient {k} of component {} is coded (missing scans)",
                        c.id
                    )),
                    b => corrupt(format!(
                        "the image ends with coefficient {k} of component {} coded only to bit {b} (missing scans)",
                        c.id
                    )),
                };
            }
        }
        Ok(())
    }
}

fn parse_sos(frame: &Frame, seg: &[u8]) -> Res<(Vec<ScanComp>, [usize; 4])> {
    let Some((&ns, rest)) = seg.split_first() else {
        return corrupt("empty header");
    };
    let ns = ns as usize;
    if !(1..=4).contains(&ns) || rest.len() != 2 * ns + 3 {
        return corrupt(format!(
            "a {}-byte header for {ns} components",
            seg.len() + 2
        ));
    }
    let mut comps: Vec<ScanComp> = Vec::with_capacity(ns);
    for p in rest[..2 * ns].chunks_exact(2) {
        let Some(c) = frame.comps.iter().position(|c| c.id == p[0]) else {
            return corrupt(format!("component id {} is not in the frame", p[0]));
        };
        let (dc, ac) = ((p[1] >> 4) as usize, (p[1] & 15) as usize);
        if comps.iter().any(|s| s.c == c) || dc > 3 || ac > 3 {
            return corrupt(format!("component {} twice or with tables {dc}/{ac}", p[0]));
        }
        // A non-interleaved scan's MCU is a single block whatever the sampling.
        let (h, v) = match ns {
            1 => (1, 1),
            _ => (frame.comps[c].h, frame.comps[c].v),
        };
        let limits = Limits::NONE;
        comps.push(ScanComp {
            c,
            h,
            v,
            dc,
            ac,
            limits,
        });
    }
    let t = &rest[2 * ns..];
    let (ss, se, ah, al) = (t[0], t[1], t[2] >> 4, t[2] & 15);
    Ok((comps, [ss as usize, se as usize, ah as usize, al as usize]))
}

/// G.1.1.1: the scan's kind from its spectral selection and successive approximation.
fn scan_kind(progressive: bool, ns: usize, [ss, se, ah, al]: [usize; 4]) -> Res<Kind> {
    if !progressive {
        if [ss, se, ah, al] != [0, 63, 0, 0] {
            return corrupt(format!(
                "a sequential scan with spectral selection {ss}..{se}, approximation {ah}/{al}"
            ));
        }
        return Ok(Kind::Sequential);
    }
    if se > 63 || ss > se || (ss == 0 && se != 0) {
        return corrupt(format!("invalid spectral selection {ss}..{se}"));
    }
    if ss > 0 && ns != 1 {
        return corrupt("an AC scan of more than one component");
    }
    if al > 13 || (ah != 0 && al + 1 != ah) {
        return corrupt(format!("invalid successive approximation {ah}/{al}"));
    }
    Ok(match (ss == 0, ah == 0) {
        (true, true) => Kind::DcFirst,
        (true, false) => Kind::DcRefine,
        (false, true) => Kind::AcFirst,
        (false, false) => Kind::AcRefine,
    })
}

/// G.1.1.1.1: a first scan of a coefficient comes once, each refinement goes one bit below
/// the last, and a component's AC comes after its DC.
fn progression(coded: &mut [i8; 64], id: u8, kind: Kind, [ss, se, ah, al]: [usize; 4]) -> Res<()> {
    if kind == Kind::Sequential {
        if coded[0] >= 0 {
            return corrupt(format!("component {id} is coded a second time"));
        }
        coded.fill(0);
        return Ok(());
    }
    if ss > 0 && coded[0] < 0 {
        return corrupt(format!(
            "AC coefficients of component {id} come before its DC"
        ));
    }
    let band = coded.iter_mut().enumerate().take(se + 1).skip(ss);
    for (k, bit) in band {
        let (was, ah) = (*bit, ah as i8);
        if ah == 0 && was >= 0 {
            return corrupt(format!(
                "coefficient {k} of component {id} is coded a second time"
            ));
        }
        if ah > 0 && was != ah {
            return corrupt(format!(
                "refines coefficient {k} of component {id} from bit {ah}, but it is coded to bit {was}"
            ));
        }
        *bit = al as i8;
    }
    Ok(())
}

/// Stray bytes tolerated between the last block of an interval or scan and its marker.
const STRAY_BYTES: usize = 16;

/// Why the bitstream walk stopped short.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// A marker (its last FF at `at`) where more data was needed.
    Marker {
        at: usize,
        code: u8,
    },
    Eof,
    /// Bits that start no code of the table.
    BadCode,
    /// A decoded value no valid stream holds.
    Bad(&'static str),
    /// Another marker (or data, code 0) where restart marker RST`want` belongs; `want` 8:
    /// a restart marker after the scan's last MCU that is not the next in turn.
    /// More data than padding and [`STRAY_BYTES`] where a restart interval or the scan ends.
    Extra,
    WrongRestart {
        at: usize,
        code: u8,
        want: u8,
    },
}

/// The walk failed; the reason is in [`Bits::fault`] (kept out of the hot return values).
struct Stop;

type Walk<T> = Result<T, Stop>;

/// The entropy-coded bytes of a scan as a stream of bits: stuffed FF 00 reads as FF, and
/// the stream stops at the first marker.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    /// Unread bits, left-aligned; `n` of them are valid, the rest 0.
    acc: u64,
    n: u32,
    /// Where the stream stopped: a marker or the end of the file.
    end: Option<Fault>,
    fault: Fault,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits {
            data,
            pos,
            acc: 0,
            n: 0,
            end: None,
            fault: Fault::Eof,
        }
    }

    #[cold]
    fn fail(&mut self, f: Fault) -> Stop {
        self.fault = f;
        Stop
    }

    /// The stream ran dry: fails with what stopped it.
    #[cold]
    fn dry(&mut self) -> Stop {
        let f = self.end.unwrap_or(Fault::Eof);
        self.fail(f)
    }

    /// Tops `acc` up to more than 56 bits, or until a marker or the end of the file.
    fn refill(&mut self) {
        if self.n <= 56 && self.end.is_none() && self.refill_word() {
            return;
        }
        while self.n <= 56 && self.end.is_none() {
            match self.data.get(self.pos) {
                None => self.end = Some(Fault::Eof),
                Some(0xFF) => self.after_ff(),
                Some(&b) => {
                    self.push(b);
                    self.pos += 1;
                }
            }
        }
    }

    /// The fast path: the next 8 bytes hold no FF, so as many as fit go in at once.
    fn refill_word(&mut self) -> bool {
        let Some(w) = self.data.get(self.pos..self.pos + 8) else {
            return false;
        };
        let Ok(w) = <[u8; 8]>::try_from(w).map(u64::from_be_bytes) else {
            return false;
        };
        let inv = !w;
        if inv.wrapping_sub(0x0101_0101_0101_0101) & !inv & 0x8080_8080_8080_8080 != 0 {
            return false;
        }
        let k = (64 - self.n) / 8;
        self.acc |= (w >> (64 - 8 * k)) << (64 - self.n - 8 * k);
        self.n += 8 * k;
        self.pos += k as usize;
        true
    }

    /// FF 00 is a data byte FF; FF followed by fill bytes FF and a code is a marker.
    fn after_ff(&mut self) {
        let mut j = self.pos + 1;
        while self.data.get(j) == Some(&0xFF) {
            j += 1;
        }
        match self.data.get(j) {
            None => self.end = Some(Fault::Eof),
            Some(0) => {
                self.push(0xFF);
                self.pos = j + 1;
            }
            Some(&code) => self.end = Some(Fault::Marker { at: j - 1, code }),
        }
    }

    #[inline]
    fn push(&mut self, b: u8) {
        self.acc |= (b as u64) << (56 - self.n);
        self.n += 8;
    }

    /// The offset of the byte holding the next unread bit.
    fn byte(&self) -> usize {
        self.pos.saturating_sub(self.n.div_ceil(8) as usize)
    }

    #[inline]
    fn consume(&mut self, len: u32) {
        self.acc <<= len;
        self.n -= len;
    }

    /// The next `s` (<= 16) bits.
    #[inline]
    fn bits(&mut self, s: u32) -> Walk<u32> {
        if s == 0 {
            return Ok(0);
        }
        if self.n < s {
            self.refill();
            if self.n < s {
                return Err(self.dry());
            }
        }
        let v = (self.acc >> (64 - s)) as u32;
        self.consume(s);
        Ok(v)
    }

    #[inline]
    fn skip(&mut self, mut s: u32) -> Walk<()> {
        while s > 0 {
            let k = s.min(16);
            self.bits(k)?;
            s -= k;
        }
        Ok(())
    }

    /// One Huffman-coded symbol.
    #[inline]
    fn decode(&mut self, t: &Huff) -> Walk<u8> {
        if self.n < 16 {
            self.refill();
        }
        let e = t.fast[(self.acc >> (64 - FAST)) as usize];
        let len = (e >> 8) & 0xFF;
        if e != 0 && len <= self.n {
            self.consume(len);
            return Ok(e as u8);
        }
        self.decode_long(t)
    }

    /// Codes longer than `FAST` bits, and the end of the stream.
    #[cold]
    fn decode_long(&mut self, t: &Huff) -> Walk<u8> {
        if t.fast[(self.acc >> (64 - FAST)) as usize] != 0 {
            return Err(self.dry());
        }
        for len in FAST as usize + 1..=16 {
            let code = (self.acc >> (64 - len)) as i32;
            if code <= t.maxcode[len] {
                if len as u32 > self.n {
                    return Err(self.dry());
                }
                self.consume(len as u32);
                let sym = usize::try_from(t.offset[len] + code)
                    .ok()
                    .and_then(|i| t.vals.get(i));
                return match sym {
                    Some(&s) => Ok(s),
                    None => Err(self.fail(Fault::BadCode)),
                };
            }
        }
        Err(if self.n < 16 {
            self.dry()
        } else {
            self.fail(Fault::BadCode)
        })
    }

    /// A symbol and the value bits after it, in one lookup where they fit.
    #[inline(always)]
    fn symbol_and_value(&mut self, t: &Huff) -> Walk<u8> {
        if self.n < 32 {
            self.refill();
        }
        let e = t.fast[(self.acc >> (64 - FAST)) as usize];
        let total = e >> 16;
        if total != 0 && total <= self.n {
            self.consume(total);
            return Ok(e as u8);
        }
        let sym = self.decode(t)?;
        self.skip(t.value_bits(sym))?;
        Ok(sym)
    }

    /// At the end of an interval: to the marker after it. Padding should be 1-bits up to the
    /// byte boundary, but other padding bits and a few stray bytes are skipped, as libjpeg
    /// does (it only warns, "N extraneous bytes before marker"): every block is there, and
    /// real datasets (ImageNet's among them) hold such files. More than [`STRAY_BYTES`] is
    /// refused: a desynchronised (corrupted) stream leaves more.
    fn align(&mut self) -> Walk<()> {
        self.refill();
        let start = self.byte();
        while self.end.is_none() {
            self.acc = 0;
            self.n = 0;
            match self.data.get(self.pos) {
                None => self.end = Some(Fault::Eof),
                Some(0xFF) => self.after_ff(),
                Some(_) => self.pos += 1,
            }
        }
        // Whole bytes before the marker, less the byte holding the padding bits.
        let stray = self.pos.saturating_sub(start + 1);
        self.acc = 0;
        self.n = 0;
        if stray > STRAY_BYTES {
            return Err(self.fail(Fault::Extra));
        }
        Ok(())
    }

    /// Steps over restart marker RST`want` (0..=7) ending the current interval.
    fn restart(&mut self, want: u8) -> Walk<()> {
        if self.align().is_err() {
            let f = match self.fault {
                Fault::Extra => Fault::WrongRestart {
                    at: 0,
                    code: 0,
                    want,
                },
                f => f,
            };
            return Err(self.fail(f));
        }
        match self.end {
            Some(Fault::Marker { at, code }) if code == 0xD0 + want => {
                self.pos = at + 2;
                self.end = None;
                Ok(())
            }
            Some(Fault::Marker { at, code }) => {
                Err(self.fail(Fault::WrongRestart { at, code, want }))
            }
            _ => Err(self.dry()),
        }
    }

    /// After the last MCU: padding, an optional last restart marker (which libjpeg
    /// tolerates), then the marker after the scan; returns its offset.
    fn end_scan(&mut self, ri: usize, mcus: usize) -> Walk<usize> {
        self.align()?;
        if let Some(Fault::Marker {
            code: 0xD0..=0xD7, ..
        }) = self.end
        {
            if ri > 0 && mcus.is_multiple_of(ri) {
                self.restart(((mcus / ri - 1) % 8) as u8)?;
                self.align()?;
            }
        }
        match self.end {
            Some(Fault::Marker { at, code }) if !(0xD0..=0xD7).contains(&code) => Ok(at),
            Some(Fault::Marker { at, code }) => {
                Err(self.fail(Fault::WrongRestart { at, code, want: 8 }))
            }
            _ => Err(self.dry()),
        }
    }
}

impl State {
    /// Walks the entropy-coded data of `scan` from `start`; returns the offset of the marker
    /// after it.
    fn walk_scan(&mut self, data: &[u8], start: usize, scan: &Scan) -> Res<usize> {
        let ri = self.restart;
        let masks: &mut [u64] = match (scan.kind, scan.comps.as_slice()) {
            (Kind::AcFirst | Kind::AcRefine, [one]) => {
                let m = &mut self.nonzero[one.c];
                if m.len() != scan.mcus {
                    *m = vec![0; scan.mcus];
                }
                m
            }
            _ => &mut [],
        };
        let tables: Vec<(Option<&Huff>, Option<&Huff>)> = scan
            .comps
            .iter()
            .map(|s| (self.dc[s.dc].as_deref(), self.ac[s.ac].as_deref()))
            .collect();
        let mut b = Bits::new(data, start);
        let mut eobrun = 0u32;
        // DC predictions, reset at each restart (F.2.1.3.1).
        let mut preds = vec![0i32; scan.comps.len()];
        let fail = |b: &Bits, mcu: usize| scan_fault(b.fault, scan, mcu, b.byte());
        for mcu in 0..scan.mcus {
            if ri > 0 && mcu > 0 && mcu.is_multiple_of(ri) {
                if eobrun > 0 {
                    b.fail(Fault::Bad("an end-of-band run passes a restart marker"));
                    return Err(fail(&b, mcu));
                }
                if b.restart(((mcu / ri - 1) % 8) as u8).is_err() {
                    return Err(fail(&b, mcu));
                }
                preds.fill(0);
            }
            let mask = masks.get_mut(mcu);
            if decode_mcu(&mut b, scan, &tables, mask, &mut preds, &mut eobrun).is_err() {
                return Err(fail(&b, mcu));
            }
        }
        if eobrun > 0 {
            b.fail(Fault::Bad("an end-of-band run passes the end of the scan"));
            return Err(fail(&b, scan.mcus));
        }
        b.end_scan(ri, scan.mcus).map_err(|_| fail(&b, scan.mcus))
    }
}

fn scan_fault(f: Fault, scan: &Scan, mcu: usize, byte: usize) -> JpegError {
    let (i, total) = (scan.index, scan.mcus);
    let after = format!("after {mcu} of {total} MCUs");
    let detail = match f {
        Fault::Eof => {
            return JpegError {
                kind: ErrorKind::Truncated,
                detail: format!("the file ends inside scan {i}, {after}"),
            }
        }
        Fault::Marker { at, code: code @ 0xD0..=0xD7 } => format!(
            "scan {i}: an unexpected restart marker RST{} at byte {at}, {after}",
            code - 0xD0
        ),
        Fault::Marker { at, code } => {
            format!("scan {i} ends {after} (marker FF{code:02X} at byte {at})")
        }
        Fault::BadCode => format!("scan {i}: an invalid Huffman code near byte {byte}, {after}"),
        Fault::Bad(what) => format!("scan {i}: {what} near byte {byte}, {after}"),
        Fault::Extra => format!("scan {i} has data past its {total} MCUs near byte {byte}"),
        Fault::WrongRestart { code: 0, want, .. } => {
            format!("scan {i}: restart marker RST{want} missing {after} (more data follows)")
        }
        Fault::WrongRestart { at, code, want: 8 } => {
            format!("scan {i}: a restart marker FF{code:02X} at byte {at} after its last MCU")
        }
        Fault::WrongRestart { at, code, want } => format!(
            "scan {i}: marker FF{code:02X} at byte {at} where restart marker RST{want} belongs, {after}"
        ),
    };
    JpegError {
        kind: ErrorKind::Corrupt,
        detail,
    }
}

fn need<'t>(b: &mut Bits, t: Option<&'t Huff>) -> Walk<&'t Huff> {
    t.ok_or_else(|| b.fail(Fault::Bad("an undefined table")))
}

/// One MCU of `scan`: each component's blocks in order.
fn decode_mcu(
    b: &mut Bits,
    scan: &Scan,
    tables: &[(Option<&Huff>, Option<&Huff>)],
    mut mask: Option<&mut u64>,
    preds: &mut [i32],
    eobrun: &mut u32,
) -> Walk<()> {
    let band = (scan.ss, scan.se);
    for ((s, &(dc, ac)), pred) in scan.comps.iter().zip(tables).zip(preds) {
        let lim = &s.limits;
        for _ in 0..s.h * s.v {
            match scan.kind {
                Kind::Sequential => {
                    let (dc, ac) = (need(b, dc)?, need(b, ac)?);
                    sequential_block(b, dc, ac, lim, pred)?
                }
                Kind::DcFirst => {
                    let dc = need(b, dc)?;
                    dc_diff(b, dc, lim, pred)?
                }
                Kind::DcRefine => b.skip(1)?,
                Kind::AcFirst | Kind::AcRefine => {
                    let ac = need(b, ac)?;
                    let Some(m) = mask.as_deref_mut() else {
                        return Err(b.fail(Fault::Bad("a block out of range")));
                    };
                    if scan.kind == Kind::AcFirst {
                        ac_first(b, ac, band, lim, eobrun, m)?
                    } else {
                        ac_refine(b, ac, band, eobrun, m)?
                    }
                }
            }
        }
    }
    Ok(())
}

/// A DC difference: its size, then its bits (F.1.2.1); the running DC value must stay in
/// the range its quantizer allows.
#[inline]
fn dc_diff(b: &mut Bits, dc: &Huff, lim: &Limits, pred: &mut i32) -> Walk<()> {
    let s = b.decode(dc)?;
    if s > lim.dc_size {
        return Err(b.fail(Fault::Bad("a DC difference too large for its quantizer")));
    }
    let v = b.bits(s as u32)? as i32;
    // F.2.2.1 EXTEND: a value whose top bit is 0 is negative.
    let diff = if s > 0 && v < 1 << (s - 1) {
        v - (1 << s) + 1
    } else {
        v
    };
    *pred += diff;
    if pred.abs() > lim.dc_max {
        return Err(b.fail(Fault::Bad("a DC value out of its quantizer's range")));
    }
    Ok(())
}

/// F.1.2.2: a sequential block, DC then run/size-coded AC up to EOB or coefficient 63.
fn sequential_block(b: &mut Bits, dc: &Huff, ac: &Huff, lim: &Limits, pred: &mut i32) -> Walk<()> {
    dc_diff(b, dc, lim, pred)?;
    let mut k = 1;
    while k < 64 {
        let rs = b.symbol_and_value(ac)?;
        let (r, s) = ((rs >> 4) as usize, rs & 15);
        match (r, s) {
            (0, 0) => return Ok(()),
            (15, 0) => k += 16,
            (_, 0) => return Err(b.fail(Fault::Bad("an invalid AC symbol"))),
            _ => {
                k += r;
                if k > 63 {
                    return Err(b.fail(Fault::Bad("a coefficient index past 63")));
                }
                if s > lim.ac_size[k] {
                    return Err(b.fail(Fault::Bad("an AC value too large for its quantizer")));
                }
                k += 1;
            }
        }
    }
    if k > 64 {
        return Err(b.fail(Fault::Bad("a zero run past coefficient 63")));
    }
    Ok(())
}

/// G.1.2.2: the first AC scan of a band, with end-of-band runs over blocks; marks the
/// coefficients it makes nonzero.
fn ac_first(
    b: &mut Bits,
    ac: &Huff,
    (ss, se): (usize, usize),
    lim: &Limits,
    eobrun: &mut u32,
    mask: &mut u64,
) -> Walk<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = b.symbol_and_value(ac)?;
        let (r, s) = ((rs >> 4) as usize, rs & 15);
        match (r, s) {
            (0..=14, 0) => {
                *eobrun = (1 << r) - 1 + b.bits(r as u32)?;
                return Ok(());
            }
            (15, 0) => k += 16,
            _ => {
                k += r;
                if k > se {
                    return Err(b.fail(Fault::Bad("a coefficient index past the band")));
                }
                if s > lim.ac_size[k] {
                    return Err(b.fail(Fault::Bad("an AC value too large for its quantizer")));
                }
                *mask |= 1 << k;
                k += 1;
            }
        }
    }
    if k > se + 1 {
        return Err(b.fail(Fault::Bad("a zero run past the band")));
    }
    Ok(())
}

/// G.1.2.3: an AC refinement scan: new coefficients of size 1 among the zero ones, and one
/// correction bit for each coefficient already nonzero that the walk passes.
fn ac_refine(
    b: &mut Bits,
    ac: &Huff,
    (ss, se): (usize, usize),
    eobrun: &mut u32,
    mask: &mut u64,
) -> Walk<()> {
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = b.decode(ac)?;
            let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
            if s == 0 && r < 15 {
                *eobrun = (1 << r) + b.bits(r as u32)?;
                break;
            }
            if s > 1 {
                return Err(b.fail(Fault::Bad("a refinement value of more than 1 bit")));
            }
            b.skip(s)?;
            k = refine_run(b, k, se, r, mask)?;
            if s == 1 {
                *mask |= 1 << k;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        if k <= se {
            let rest = *mask & (u64::MAX >> (63 - se)) & (u64::MAX << k);
            b.skip(rest.count_ones())?;
        }
        *eobrun -= 1;
    }
    Ok(())
}

/// From coefficient `k`, skips `r` zero coefficients, reading the correction bit of each
/// nonzero one on the way; returns the next zero one, where a new coefficient may go.
fn refine_run(b: &mut Bits, mut k: usize, se: usize, mut r: usize, mask: &u64) -> Walk<usize> {
    loop {
        if k > se {
            return Err(b.fail(Fault::Bad("a zero run past the band")));
        }
        if *mask & 1 << k != 0 {
            b.skip(1)?;
        } else if r == 0 {
            return Ok(k);
        } else {
            r -= 1;
        }
        k += 1;
    }
}

#[cfg(test)]
mod tests;
