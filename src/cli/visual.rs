//! Live views of a denoising run for `generate`/`fill`/`infill`/`edit`: `--visual` (the canvas
//! redrawn every step) and `--stream` (final text printed as blocks complete).
//!
//! `--visual` on a terminal redraws the canvas in place with ANSI cursor control: each masked
//! position is a shade block `░`, tokens committed by the step are highlighted, tokens re-masked
//! by `--revise` show as `▒`. When stdout is not a terminal it prints one plain line per step
//! instead (no escape codes). `--stream` appends the canvas prefix that is final (blocks
//! completed, see `StepReport::final_prefix`) and flushes; it is the same on a terminal and in a
//! pipe, and its complete output equals the text printed without `--stream`.

use super::out;
use dllm::chat::until_first;
use dllm::denoise::StepEvent;
use dllm::error::Result;
use dllm::tokenizer::Tokenizer;
use std::ops::Range;

/// Shown for each masked position.
pub const MASK_GLYPH: char = '░';
/// Shown for each position re-masked by the step (self-correction).
pub const REMASK_GLYPH: char = '▒';
const HIGHLIGHT: &str = "\x1b[1;7m";
const RESET: &str = "\x1b[0m";
/// Cursor to the top-left corner, then clear to the end of the screen.
const HOME_CLEAR: &str = "\x1b[H\x1b[J";

/// What a position of the canvas shows in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// A token that was there before the step.
    Token,
    /// A token committed by this step.
    Fresh,
    /// A mask.
    Mask,
    /// A mask set by this step's self-correction.
    Remasked,
}

/// Runs of equal [`Cell`]s covering the canvas, in order.
pub fn segments(
    canvas: &[u32],
    mask: u32,
    committed: &[usize],
    remasked: &[usize],
) -> Vec<(Cell, Range<usize>)> {
    let cell = |p: usize| {
        if canvas[p] == mask {
            if remasked.binary_search(&p).is_ok() {
                Cell::Remasked
            } else {
                Cell::Mask
            }
        } else if committed.binary_search(&p).is_ok() {
            Cell::Fresh
        } else {
            Cell::Token
        }
    };
    let mut out: Vec<(Cell, Range<usize>)> = Vec::new();
    for p in 0..canvas.len() {
        let c = cell(p);
        match out.last_mut() {
            Some((last, r)) if *last == c => r.end = p + 1,
            _ => out.push((c, p..p + 1)),
        }
    }
    out
}

/// The text of one frame: token runs decoded together, one glyph per mask, fresh tokens wrapped
/// in `highlight`/`reset` (empty strings for no styling).
pub fn render(
    segs: &[(Cell, Range<usize>)],
    mut decode: impl FnMut(Range<usize>) -> Result<String>,
    highlight: &str,
    reset: &str,
) -> Result<String> {
    let mut s = String::new();
    for (cell, r) in segs {
        match cell {
            Cell::Token => s.push_str(&decode(r.clone())?),
            Cell::Fresh => {
                s.push_str(highlight);
                s.push_str(&decode(r.clone())?);
                s.push_str(reset);
            }
            Cell::Mask => s.extend(std::iter::repeat_n(MASK_GLYPH, r.len())),
            Cell::Remasked => s.extend(std::iter::repeat_n(REMASK_GLYPH, r.len())),
        }
    }
    Ok(s)
}

/// The plain per-step line of `--visual` when stdout is not a terminal.
pub fn plain_line(e: &StepEvent, total: usize) -> String {
    let mut s = format!(
        "step {}/{} committed {} masks_left {}",
        e.step + 1,
        total,
        e.committed.len(),
        e.masks_left
    );
    if !e.remasked.is_empty() {
        s.push_str(&format!(" remasked {}", e.remasked.len()));
    }
    for b in &e.completed {
        s.push_str(&format!(
            " block_done {} {}..{}",
            b.block, b.span.start, b.span.end
        ));
    }
    s
}

/// The part of `text` not yet printed when `printed` (what was printed so far) is its prefix and
/// `text` does not end inside a character the tokenizer could not decode yet (`�`); `None`
/// otherwise, so nothing printed ever has to be taken back.
pub fn stream_delta<'a>(printed: &str, text: &'a str) -> Option<&'a str> {
    let rest = text.strip_prefix(printed)?;
    let rest = rest.trim_end_matches('\u{FFFD}');
    (!rest.is_empty()).then_some(rest)
}

/// Which live view a run shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Visual { tty: bool },
    Stream,
}

/// The live view of one run, writing to stdout.
pub struct View<'a> {
    mode: Mode,
    tok: &'a Tokenizer,
    mask: u32,
    total_steps: usize,
    /// `--stream`: text printed so far.
    printed: String,
    /// `--stream` of a chat answer: the canvas position the answer starts at and the tokens
    /// that end it ([`View::answer_only`]).
    answer: Option<(usize, Vec<u32>)>,
    /// Whether [`View::finish`] ends the text with a newline.
    final_newline: bool,
    /// `--visual` on a terminal: frames drawn so far.
    frames: usize,
}

impl<'a> View<'a> {
    pub fn new(mode: Mode, tok: &'a Tokenizer, mask: u32, total_steps: usize) -> View<'a> {
        View {
            mode,
            tok,
            mask,
            total_steps,
            printed: String::new(),
            answer: None,
            final_newline: true,
            frames: 0,
        }
    }

    /// [`View::finish`] prints the text as it is, without a newline after it (an edited file).
    pub fn without_final_newline(mut self) -> View<'a> {
        self.final_newline = false;
        self
    }

    /// `--stream` shows only the canvas from position `start` up to the first of `stops`: a
    /// chat answer, which is all `generate --chat` prints.
    pub fn answer_only(mut self, start: usize, stops: &[u32]) -> View<'a> {
        self.answer = Some((start, stops.to_vec()));
        self
    }

    /// Shows the canvas before the first step (`final_prefix`: its final prefix length).
    pub fn start(&mut self, canvas: &[u32], final_prefix: usize) -> Result<()> {
        match self.mode {
            Mode::Stream => self.stream(&canvas[..final_prefix]),
            Mode::Visual { tty: true } => {
                let masks = canvas.iter().filter(|&&t| t == self.mask).count();
                let head = format!("step 0/{}  masks left {masks}", self.total_steps);
                self.frame(canvas, &[], &[], &head)
            }
            _ => Ok(()),
        }
    }

    /// Shows one step.
    pub fn step(&mut self, e: &StepEvent) -> Result<()> {
        match self.mode {
            Mode::Off => Ok(()),
            Mode::Stream => {
                if e.completed.is_empty() {
                    return Ok(());
                }
                self.stream(&e.canvas[..e.final_prefix])
            }
            Mode::Visual { tty: false } => out::line(plain_line(e, self.total_steps)),
            Mode::Visual { tty: true } => {
                let mut head = format!(
                    "step {}/{}  committed {}  masks left {}",
                    e.step + 1,
                    self.total_steps,
                    e.committed.len(),
                    e.masks_left
                );
                if !e.remasked.is_empty() {
                    head.push_str(&format!("  re-masked {}", e.remasked.len()));
                }
                self.frame(e.canvas, &e.committed, &e.remasked, &head)
            }
        }
    }

    /// Prints the final text: for `--stream` whatever is not printed yet, else the whole text
    /// (after the last frame for `--visual`); then a newline unless
    /// [`View::without_final_newline`].
    pub fn finish(&mut self, text: &str) -> Result<()> {
        let end = if self.final_newline { "\n" } else { "" };
        match self.mode {
            Mode::Stream => match text.strip_prefix(self.printed.as_str()) {
                Some(rest) => out::print(format_args!("{rest}{end}")),
                // The tokenizer decoded a prefix differently from the whole text (should not
                // happen); start over on a new line rather than print a wrong text.
                None => out::print(format_args!("\n{text}{end}")),
            },
            Mode::Visual { tty: true } if self.frames > 0 => {
                out::print(format_args!("\n\n{text}{end}"))
            }
            _ => out::print(format_args!("{text}{end}")),
        }
    }

    fn stream(&mut self, ids: &[u32]) -> Result<()> {
        let ids = match &self.answer {
            Some((start, stops)) => until_first(&ids[(*start).min(ids.len())..], stops),
            None => ids,
        };
        let text = self.tok.decode(ids, true)?;
        if let Some(delta) = stream_delta(&self.printed, &text) {
            out::print(delta)?;
            self.printed.push_str(delta);
        }
        Ok(())
    }

    fn frame(
        &mut self,
        canvas: &[u32],
        committed: &[usize],
        remasked: &[usize],
        head: &str,
    ) -> Result<()> {
        let segs = segments(canvas, self.mask, committed, remasked);
        let body = render(
            &segs,
            |r| self.tok.decode(&canvas[r], false),
            HIGHLIGHT,
            RESET,
        )?;
        out::print(format_args!("{HOME_CLEAR}{head}\n\n{body}"))?;
        self.frames += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dllm::denoise::{BlockDone, StepReport};

    #[test]
    fn segments_group_runs() {
        // Canvas 5 6 M M 7 M 8 (1 = mask): position 4 committed by the step, 5 re-masked by it.
        let c = [5, 6, 1, 1, 7, 1, 8];
        let s = segments(&c, 1, &[4], &[5]);
        assert_eq!(
            s,
            vec![
                (Cell::Token, 0..2),
                (Cell::Mask, 2..4),
                (Cell::Fresh, 4..5),
                (Cell::Remasked, 5..6),
                (Cell::Token, 6..7)
            ]
        );
        assert!(segments(&[], 1, &[], &[]).is_empty());
    }

    #[test]
    fn render_shows_one_glyph_per_mask_and_highlights_fresh_tokens() {
        let c = [5u32, 6, 1, 1, 7, 1, 8];
        let segs = segments(&c, 1, &[4], &[5]);
        // Decoding a run = its ids joined by '-'.
        let dec = |r: Range<usize>| {
            Ok(c[r]
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join("-"))
        };
        assert_eq!(render(&segs, dec, "<", ">").unwrap(), "5-6░░<7>▒8");
        assert_eq!(render(&segs, dec, "", "").unwrap(), "5-6░░7▒8");
    }

    #[test]
    fn plain_line_lists_the_step() {
        let r = StepReport {
            step: 2,
            block: Some(0),
            committed: vec![3, 4],
            remasked: vec![1],
            completed: vec![BlockDone {
                block: 0,
                span: 2..6,
            }],
            final_prefix: 6,
            masks_left: 5,
            done: false,
        };
        let e = StepEvent {
            report: &r,
            canvas: &[],
        };
        assert_eq!(
            plain_line(&e, 8),
            "step 3/8 committed 2 masks_left 5 remasked 1 block_done 0 2..6"
        );
        let r = StepReport {
            remasked: vec![],
            completed: vec![],
            ..r
        };
        let line = plain_line(
            &StepEvent {
                report: &r,
                canvas: &[],
            },
            8,
        );
        assert_eq!(line, "step 3/8 committed 2 masks_left 5");
        assert!(!line.contains('\x1b'));
    }

    #[test]
    fn stream_delta_prints_only_new_complete_text() {
        assert_eq!(stream_delta("", "def f"), Some("def f"));
        assert_eq!(stream_delta("def", "def f():"), Some(" f():"));
        assert_eq!(stream_delta("def", "def"), None);
        // Not a continuation: nothing (never take back what was printed).
        assert_eq!(stream_delta("def g", "def f():"), None);
        // A character split across tokens waits for its other bytes.
        assert_eq!(stream_delta("a", "ab\u{FFFD}"), Some("b"));
        assert_eq!(stream_delta("a", "a\u{FFFD}"), None);
    }
}
