/*
 * submission.pml -- the ClusterJob submission / adoption / cancellation protocol.
 *
 * One ClusterJob row (emg.models.ClusterJob), NTICKS reconciler ticks running at
 * the same time (workers/reconcile/submissions.py; overlapping is allowed, whatever
 * the beat lock promises), a Slurm controller, the network between them, and an
 * operator who may cancel the request at any moment.  Every write to the row is a
 * compare-and-set UPDATE (emg/jobs.py): one `atomic` block that tests the WHERE
 * clause and writes only if it holds.  Everything else a tick does (reading the row,
 * asking Slurm, scancel) is a separate step, and a tick may crash between any two
 * steps (CRASH_POINT); the process then starts a fresh tick, as the next beat would.
 *
 * Build flags (spin -D...):
 *   NTICKS=n            concurrent ticks (default 2; 3 is valid but far too big to check in seconds)
 *   LIVENESS            faults stop for ever after some point (see `calm`), and a
 *                       returned sbatch makes its claim stale at once: for the <> properties
 *                       and a tick does its steps in the real order (safety builds let a
 *                       tick do its steps in any order, a superset of the real behaviours)
 *   LEASE_CAN_LAPSE     drop the timing assumption: a claim may look stale at any moment,
 *                       even while its sbatch is still running (a tick paused longer than
 *                       the lease).  The safety properties must hold without the assumption.
 *   STRONG_QUIESCENCE   also check the strong form of property 2 (known NOT to hold)
 * Planted bugs, each must be caught (scripts/model-check.sh --planted):
 *   UNCONDITIONAL_CLAIM   claim ignores its WHERE clause
 *   NO_RECORD_GUARD       record_submission only checks state=DECLARED
 *   SCANCEL_ADOPTED       a failed record_submission scancels its job even when another
 *                         tick adopted that very job (the row owns it now)
 *   SWEEP_READS_ROW_FIRST cancel_orphans reads the row before listing Slurm's jobs
 */

#ifndef NTICKS
#define NTICKS 2
#endif
#define MAX_ATTEMPTS 2          /* the model's bound: declare_again and reclaim stop here */
#define MAXJOBS 4               /* Slurm job ids 1..MAXJOBS; the correct protocol needs MAX_ATTEMPTS */

/* ClusterJob.state.  SUBMITTED stands for every live Slurm state (SUBMITTED/PENDING/RUNNING). */
#define DECLARED      1
#define SUBMITTED     2
#define OUT_OF_MEMORY 3
#define COMPLETED     4
#define CANCELLED     5
#define REJECTED      6
#define FINAL(s) ((s) == COMPLETED || (s) == CANCELLED || (s) == REJECTED)

/* A Slurm job's status */
#define J_NONE      0
#define J_LIVE      1
#define J_COMPLETED 2
#define J_OOM       3
#define J_CANCELLED 4

/* sbatch outcomes, as the tick sees them */
#define ANSWERED    1           /* job created, id returned */
#define LOST_ANSWER 2           /* job created, the tick dies before it hears the id */
#define TRANSIENT   3           /* error; no job (or: the request is still on its way, see `pending`) */
#define PERMANENT   4           /* Slurm rejects the script for good; no job */
#define FAILED      5           /* record_submission's CAS did not apply */

/* ---- the ClusterJob row ---- */
byte state = DECLARED;
byte attempts = 0;
byte submission_started_at = 0; /* NULL = 0; a claim's token otherwise.  Claim times are unique,
                                   and every claim makes a new attempt, so the token is the
                                   attempt number the claim made. */
byte slurm_job_id = 0;          /* '' = 0 */
bool cancel_wanted = false;     /* the request was cancelled by an operator */

/* ---- Slurm: jobs never disappear from the model (sacct keeps ended ones) ---- */
byte njobs = 0;
byte job_tag[MAXJOBS + 1];      /* the attempt n of the job's tag (row, n) */
byte job_status[MAXJOBS + 1];

/* ---- time, abstracted ---- */
bool busy[MAX_ATTEMPTS + 1];    /* the tick holding claim n has not yet returned from (or been killed
                                   in) its sbatch.  sbatch runs under a timeout shorter than the lease,
                                   so a busy claim is never stale -- unless LEASE_CAN_LAPSE. */
byte pending = 0;               /* an sbatch request for tag (row, pending) that the client gave up on
                                   (timeout, or the tick died) but that may still reach slurmctld,
                                   at any later time, long after the lease expired */
bool calm = false;              /* LIVENESS: from here on no tick crashes and sbatch always answers */

/* ---- ghosts for the properties ---- */
/* Named constants, all false: a failed assert(name) prints the property's name. */
bool p1_one_live_job_per_tag, p2_cancelled_row_swept_clean, p3_one_job_per_attempt,
     p4_submitted_row_owns_its_job, p5_cancelled_only_on_request, p2_strong_quiescence;
#ifdef STRONG_QUIESCENCE
bool in_tick[NTICKS];           /* tick i is in the middle of a tick */
#define IN_TICK(b) in_tick[me] = b
#else
#define IN_TICK(b) skip
#endif

#ifdef LIVENESS
#define NEXT(step) goto step
#else
#define NEXT(step) goto start
#endif

#define CHANGED skip            /* every write to the row or to Slurm's job list (a hook for tracing) */

#ifdef LIVENESS
#define FAULTS_ALLOWED (!calm && attempts < MAX_ATTEMPTS)
#else
#define FAULTS_ALLOWED true
#endif

/* A tick may die between any two steps: the process starts a new tick later. */
#define CRASH_POINT  if :: FAULTS_ALLOWED -> goto crashed :: true -> skip fi

/* Is claim c stale (lease expired, or its retry time passed)?  Time is not modelled,
   only what the timing assumption guarantees: a claim whose sbatch is still running is
   fresh.  Otherwise it may be stale or still fresh (the lease has not run out yet). */
#if defined(LIVENESS)
#define READ_STALE(c, stale) stale = ((c) != 0 && !busy[c])
#elif defined(LEASE_CAN_LAPSE)
#define READ_STALE(c, stale) if :: stale = ((c) != 0) :: stale = false fi
#else
#define READ_STALE(c, stale) if :: stale = ((c) != 0 && !busy[c]) :: stale = false fi
#endif

/* ---- the WHERE clauses ---- */
#ifdef UNCONDITIONAL_CLAIM
#define CLAIM_GUARD(a) (true)
#else
/* Only an unclaimed DECLARED row at the attempt we read: two ticks that both read
   attempts=a cannot both make attempt a+1, so a tag (row, a+1) is sbatched once. */
#define CLAIM_GUARD(a) (state == DECLARED && submission_started_at == 0 && attempts == (a))
#endif

#ifdef NO_RECORD_GUARD
#define SAME_CLAIM(a, c) (state == DECLARED)
#else
/* Still our claim: nobody adopted, reclaimed, cancelled, rejected or re-declared the
   row since we claimed it.  Used by record_submission, note_submit_error, reject,
   adopt, reclaim and cancel_declared. */
#define SAME_CLAIM(a, c) (state == DECLARED && attempts == (a) && submission_started_at == (c))
#endif

/* ---- Slurm operations ---- */

#define live(i)         (job_status[i] == J_LIVE)
#define exists(i)       (job_status[i] != J_NONE)
#define twin_live(i, k) (live(i) && live(k) && job_tag[i] == job_tag[k])
#define twin(i, k)      (exists(i) && exists(k) && job_tag[i] == job_tag[k])
#define no_live         (!live(1) && !live(2) && !live(3) && !live(4))
#define all_idle        (!in_tick[0] && !in_tick[1] && !in_tick[NTICKS - 1])

/* slurmctld creates a job with tag (row, tag).  Only the planted bugs need more than
   MAX_ATTEMPTS ids; the guard comes first so it blocks before the atomic starts. */
inline create_job(tag, k) {
    njobs < MAXJOBS;
    njobs++; k = njobs; job_tag[k] = tag; job_status[k] = J_LIVE; CHANGED
}

/* squeue/sacct --name: the job with this tag, live or ended; 0 if Slurm has none.
   (Always called inside an atomic step.) */
inline find_by_tag(tag, k) {
    k = 0;
    if :: njobs >= 1 && job_tag[1] == tag -> k = 1 :: else fi;
    if :: njobs >= 2 && job_tag[2] == tag -> k = 2 :: else fi;
    if :: njobs >= 3 && job_tag[3] == tag -> k = 3 :: else fi;
    if :: njobs >= 4 && job_tag[4] == tag -> k = 4 :: else fi
}

inline scancel(k) {
    atomic { if :: job_status[k] == J_LIVE -> job_status[k] = J_CANCELLED :: else fi }
}

/*
 * A tick.  Granularity: each `atomic` is one database statement or one Slurm call (plus the
 * tick's own bookkeeping).  A read followed by a CAS whose WHERE clause re-checks everything
 * the read returned is folded into one step where nothing else happens in between (the CAS
 * would fail, which is the same as not trying); steps with an effect in between (sbatch,
 * find_by_tag, scancel) stay apart.  Every step may be the one the tick dies at.
 */
proctype tick(byte me) {
    byte s, a, c, j, k, mine, st, listed;
    bool stale;

start:
    /* a step's locals are its own: nothing read in one step is trusted in the next */
    atomic { s = 0; a = 0; c = 0; j = 0; k = 0; mine = 0; st = 0; listed = 0; stale = false }
#ifndef LIVENESS
    /* Safety builds: a tick does its steps in any order, any number of times -- every real
       tick's order is one of these runs, and the model stays small.  The LIVENESS build keeps
       the real order (1..5) so that a tick that keeps running does every step. */
    if
    :: goto submit_step
    :: goto cancel_step
    :: goto refresh_step
    :: goto declare_step
    :: goto sweep_step
    fi;
#endif
submit_step:
    /* ==== 1. submission: claim an unclaimed row, or take over a stale claim ==== */
    atomic { IN_TICK(true); s = state; a = attempts; c = submission_started_at; READ_STALE(c, stale) }
    if
    :: s == DECLARED && c == 0 && a < MAX_ATTEMPTS ->
        claim: atomic {
            CRASH_POINT;
            if
            :: CLAIM_GUARD(a) -> attempts = a + 1; submission_started_at = a + 1;
                                 mine = a + 1; busy[mine] = true; CHANGED
            :: else -> skip
            fi
        }
    :: s == DECLARED && c != 0 && stale ->
        /* the claimer's sbatch is over: Slurm knows whether it made the job */
        atomic { CRASH_POINT; find_by_tag(a, k) }
        if
        :: k != 0 ->
            adopt: atomic {
                CRASH_POINT;
                if :: SAME_CLAIM(a, c) -> state = SUBMITTED; slurm_job_id = k; CHANGED :: else -> skip fi
            }
        :: k == 0 && a < MAX_ATTEMPTS ->
            /* no job: a new attempt, so a new tag -- a late request for (row, a) can never
               become a second job of the attempt submitted now */
            reclaim: atomic {
                CRASH_POINT;
                if
                :: SAME_CLAIM(a, c) -> attempts = a + 1; submission_started_at = a + 1;
                                       mine = a + 1; busy[mine] = true; CHANGED
                :: else -> skip
                fi
            }
        :: else -> skip                     /* the model's bound on attempts */
        fi
    :: else -> skip
    fi;

    /* claim and reclaim go on the same way: sbatch with tag (row, mine) */
    if
    :: mine != 0 ->
        atomic {
            CRASH_POINT;
            busy[mine] = false;             /* sbatch returns or is killed: the claim may go stale */
            if
            :: create_job(mine, k); st = ANSWERED
            :: FAULTS_ALLOWED -> create_job(mine, k); st = LOST_ANSWER
            :: FAULTS_ALLOWED -> st = TRANSIENT
            :: FAULTS_ALLOWED && pending == 0 -> pending = mine; st = TRANSIENT  /* timed out, still travelling */
            :: st = PERMANENT
            fi
        }
        if
        :: st == ANSWERED ->
            /* the answer may reach record_submission late: other ticks run meanwhile */
            record_submission: atomic {
                CRASH_POINT;
                if
                :: SAME_CLAIM(mine, mine) -> state = SUBMITTED; slurm_job_id = k; st = 0; CHANGED
                :: else -> st = FAILED
                fi
            }
            if
            :: st == FAILED ->
                /* someone else owns the row now, so the job we made is nobody's -- unless
                   whoever took the row over adopted this very job */
#ifdef SCANCEL_ADOPTED
                atomic { CRASH_POINT; scancel(k) }
#else
                atomic { CRASH_POINT; j = slurm_job_id }        /* re-read the row */
                atomic { CRASH_POINT; if :: j != k -> scancel(k) :: else -> skip fi }
#endif
            :: else -> skip
            fi
        :: st == LOST_ANSWER -> goto crashed
        :: st == TRANSIENT ->
            /* keep the claim, set a retry time (time is not modelled: the claim may go stale) */
            note_submit_error: atomic { CRASH_POINT; if :: SAME_CLAIM(mine, mine) -> skip :: else -> skip fi }
        :: st == PERMANENT ->
            reject: atomic { CRASH_POINT; if :: SAME_CLAIM(mine, mine) -> state = REJECTED; CHANGED :: else -> skip fi }
        fi
    :: else -> skip
    fi;
    NEXT(cancel_step);

    /* ==== 2. cancel_declared / cancel step ==== */
cancel_step:
    atomic {
        CRASH_POINT;
        s = state; a = attempts; c = submission_started_at; j = slurm_job_id; k = 0; mine = 0; st = 0; stale = false;
        if
        :: cancel_wanted && s == DECLARED && c == 0 ->
            /* cancel_declared, unclaimed: WHERE state=DECLARED AND claim IS NULL AND attempts=a */
            state = CANCELLED; CHANGED
        :: cancel_wanted && s == SUBMITTED && j != 0 ->
            scancel(j)                      /* the refresh records CANCELLED */
        :: else -> skip
        fi
    }
    if
    :: cancel_wanted && s == DECLARED && c != 0 ->
        atomic { CRASH_POINT; find_by_tag(a, k) }
        if
        :: k != 0 ->
            atomic { CRASH_POINT; scancel(k) }
            cancel_declared: atomic {
                CRASH_POINT;
                if :: SAME_CLAIM(a, c) -> state = CANCELLED; CHANGED :: else -> skip fi
            }
        :: else ->
            /* not found: cancel only a stale claim (the clock is read after the look-up).
               A late answer's record_submission then fails and its tick scancels the job;
               a request still on its way makes an orphan for cancel_orphans. */
            atomic {
                CRASH_POINT;
                READ_STALE(c, stale);
                if :: stale && SAME_CLAIM(a, c) -> state = CANCELLED; CHANGED :: else -> skip fi;
                stale = false
            }
        fi
    :: else -> skip
    fi;
    NEXT(refresh_step);

    /* ==== 3. refresh: record_status (CAS WHERE state=s AND attempts=a AND slurm_job_id=j) ==== */
refresh_step:
    atomic {
        CRASH_POINT;
        s = state; a = attempts; c = 0; j = slurm_job_id; k = 0;
        if
        :: s == SUBMITTED && j != 0 && job_status[j] != J_LIVE ->
            if
            :: job_status[j] == J_COMPLETED -> state = COMPLETED
            :: job_status[j] == J_OOM -> state = OUT_OF_MEMORY
            :: job_status[j] == J_CANCELLED -> state = CANCELLED
            fi;
            CHANGED
        :: else -> skip
        fi;
        s = 0; a = 0; j = 0
    }
    NEXT(declare_step);

    /* ==== 4. declare_again (CAS WHERE state=OUT_OF_MEMORY AND attempts=a AND slurm_job_id=j) ==== */
declare_step:
    declare_again: atomic {
        CRASH_POINT;
        s = state; a = attempts; j = slurm_job_id;
        if
        :: s == OUT_OF_MEMORY && a < MAX_ATTEMPTS ->
            state = DECLARED; submission_started_at = 0; slurm_job_id = 0; CHANGED
        :: else -> skip
        fi;
        s = 0; a = 0; j = 0
    }
    NEXT(sweep_step);

    /* ==== 5. cancel_orphans ==== */
    /* A job (row, n) with n == attempts while the row is DECLARED and claimed is not an
       orphan: its answer may still be on its way to record_submission. */
#define LIVE_SET ((live(1) -> 1 : 0) | (live(2) -> 2 : 0) | (live(3) -> 4 : 0) | (live(4) -> 8 : 0))
#define LIST_SLURM listed = LIVE_SET
#define ORPHAN(i) ((listed & (1 << (i - 1))) != 0 && \
                   (job_tag[i] < a || (FINAL(s) && j != i) || (j != 0 && j != i)))
#define SCANCEL_ORPHANS \
        if :: ORPHAN(1) -> scancel(1) :: else -> skip fi; \
        if :: ORPHAN(2) -> scancel(2) :: else -> skip fi; \
        if :: ORPHAN(3) -> scancel(3) :: else -> skip fi; \
        if :: ORPHAN(4) -> scancel(4) :: else -> skip fi
sweep_step:
#ifndef SWEEP_READS_ROW_FIRST
    /* List Slurm first, then read the row: a row read after the listing is newer than every
       listed job, so "slurm_job_id set and differs" can only mean an older attempt. */
    atomic { CRASH_POINT; LIST_SLURM }
    cancel_orphans: atomic {
        CRASH_POINT;
        s = state; a = attempts; j = slurm_job_id;
        SCANCEL_ORPHANS;
#else
    atomic { CRASH_POINT; s = state; a = attempts; j = slurm_job_id }
    cancel_orphans: atomic {
        CRASH_POINT;
        LIST_SLURM;
        SCANCEL_ORPHANS;
#endif
        /* scancels of distinct jobs commute: one step for the whole sweep */

        /* Property 2: a pass that listed every job live now, and whose view of the row is
           still the row, leaves no live job for a cancelled row. */
        if
        :: (LIVE_SET & ~listed) == 0 && s == state && a == attempts && j == slurm_job_id &&
           state == CANCELLED && !no_live -> assert(p2_cancelled_row_swept_clean)
        :: else -> skip
        fi;
        s = 0; a = 0; j = 0; listed = 0;
        IN_TICK(false)
    }
    goto start;

crashed:
    atomic {
        if :: mine != 0 -> busy[mine] = false :: else -> skip fi;   /* its sbatch dies with it */
        IN_TICK(false);
        s = 0; a = 0; c = 0; j = 0; k = 0; mine = 0; st = 0; listed = 0; stale = false
    }
    goto start
}

/* Slurm runs jobs to their end on its own */
active proctype slurm() {
end_slurm:
    do
    :: atomic { live(1) -> if :: job_status[1] = J_COMPLETED :: job_status[1] = J_OOM fi }
    :: atomic { live(2) -> if :: job_status[2] = J_COMPLETED :: job_status[2] = J_OOM fi }
    :: atomic { live(3) -> if :: job_status[3] = J_COMPLETED :: job_status[3] = J_OOM fi }
    :: atomic { live(4) -> if :: job_status[4] = J_COMPLETED :: job_status[4] = J_OOM fi }
    od
}

/* A request whose client gave up reaches slurmctld some time later, or never. */
active proctype network() {
    byte k;
end_network:
    do
    :: atomic { pending != 0 -> create_job(pending, k); pending = 0; k = 0 }
    :: atomic { pending != 0 -> pending = 0 }
    od
}

/* The operator may cancel the request at any moment (or never). */
active proctype operator() {
    if :: cancel_wanted = true :: skip fi
}

#ifdef LIVENESS
/* Faults stop for ever after some point.  (And, in this build, once the row is at its
   last attempt: the bound on attempts must not be what stops progress.) */
active proctype environment() {
    calm = true
}
#endif

init {
    byte n = 0;
    atomic {
        do
        :: n < NTICKS -> run tick(n); n++
        :: else -> break
        od
    }
}

/* ---------------- properties ---------------- */

/* Safety properties, checked in every reachable state by a monitor whose statements are
   enabled only when a property is false (so it adds no states). */
#ifndef LIVENESS
active proctype monitor() {
end_monitor:
    do
    :: atomic { (twin_live(1, 2) || twin_live(1, 3) || twin_live(1, 4) ||
                 twin_live(2, 3) || twin_live(2, 4) || twin_live(3, 4)) ->
                /* 1. never two live Slurm jobs with the same tag (row, attempt) */
                assert(p1_one_live_job_per_tag) }
    :: atomic { (twin(1, 2) || twin(1, 3) || twin(1, 4) || twin(2, 3) || twin(2, 4) || twin(3, 4)) ->
                /* 3a. every attempt is submitted (sbatch creating a job) at most once */
                assert(p3_one_job_per_attempt) }
    :: atomic { (state == SUBMITTED && slurm_job_id != 0 &&
                 !(job_tag[slurm_job_id] == attempts && exists(slurm_job_id) &&
                   (job_status[slurm_job_id] != J_CANCELLED || cancel_wanted))) ->
                /* 4. a SUBMITTED row's slurm_job_id is a job with the row's current tag,
                   live or just ended, and not cancelled unless the operator asked */
                assert(p4_submitted_row_owns_its_job) }
    :: atomic { (state == CANCELLED && !cancel_wanted) ->
                /* 5. a row ends CANCELLED only when the operator asked */
                assert(p5_cancelled_only_on_request) }
#ifdef STRONG_QUIESCENCE
    :: atomic { (all_idle && pending == 0 && state == CANCELLED && !no_live) ->
                /* 2''. the strong form of 2: when no tick is running and no request is on
                   its way, a cancelled row has no live job.  Does NOT hold: a tick that dies
                   between sbatch and record_submission leaves a live job until the next
                   tick's cancel_orphans. */
                assert(p2_strong_quiescence) }
#endif
    od
}
#endif

/* 2. (checked in cancel_orphans above) after a complete cancel_orphans pass that saw every job
   live now and the row as it is, no job is live for a cancelled row. */

/* 2'. with faults stopping and ticks running on, a cancelled row ends up with no live job for ever */
ltl p2_cancelled_row_eventually_clean {
    [] ((state == CANCELLED) -> <> [] no_live)
}

/* 3b. a DECLARED row is eventually SUBMITTED or ended */
ltl p3_declared_row_progresses {
    [] ((state == DECLARED) -> <> (state != DECLARED))
}
